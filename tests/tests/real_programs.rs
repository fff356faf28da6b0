//! End-to-end: real Debian programs dumped and restored through the floe
//! binary, checked from the outside through what they serve or write.
//!
//! * `redis-server` (event loop on epoll, bio threads, pipes) holding 100k
//!   keys: every sampled key, DBSIZE and a new SET/GET after the restore.
//! * `memcached -t 4` (libevent worker threads, LRU/crawler threads): 10k
//!   keys all read back, a new one stored.
//! * `nginx`, a master and two workers (shared listening socket, unix
//!   socketpair channels; workers as root, and as nobody): same pids, same
//!   file served, and a graceful SIGQUIT still goes through the channels
//!   (their O_ASYNC owner and signal are restored).
//! * a threaded `python3`, dumped and restored twice: no gap or repeat.
//! * `tar -cf` of ~150 MB dumped mid-way: the archive is byte-identical to
//!   an uninterrupted run.
//! * `git clone` of a local repository of 300 commits through a throttled
//!   upload-pack (a 7-process tree of pipes) dumped mid-transfer: the clone
//!   completes, fsck passes and HEAD matches.
//! * `ping` of 127.0.0.1 (raw ICMP sockets): no sequence gap, no loss.
//!
//! Each program runs in its own session (setsid), stdin /dev/null, output
//! to a log file, in the foreground, on 127.0.0.1 with a free port and its
//! own temp dir. Clients are disconnected before each dump (established TCP
//! connections are refused by floe). Needs root; a test whose program is
//! not installed prints a SKIPPED line (CI installs them all, see .ci/run).
//!
//! Restored processes are not children of the test: [`TreeGuard`] and
//! [`Fixture`] kill them by pid (checking the start time) and wait for
//! /proc/PID to vanish, panics included.
#![allow(clippy::unwrap_used)] // tests: a panic is the failure report

use floe_tests::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::{BufRead, BufReader, BufWriter, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// How long the original processes of a dumped tree (killed by floe, then
/// reaped by PID 1, which is slow here) may take to vanish.
const ORIGINALS_GONE: Duration = Duration::from_secs(10);
/// How long a server may take to listen (at start and after the restore).
const LISTEN_TIMEOUT: Duration = Duration::from_secs(10);
/// Read/write timeout of every client connection.
const IO_TIMEOUT: Duration = Duration::from_secs(10);

// ---------------------------------------------------------------------------
// helpers

/// `name` looked up in PATH, then in the sbin directories (nginx lives in
/// /usr/sbin, which a non-login PATH may lack).
fn find_program(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/local/sbin", "/usr/sbin", "/sbin", "/usr/bin", "/bin"].iter().map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| fs::metadata(p).is_ok_and(|m| m.is_file() && m.permissions().mode() & 0o111 != 0))
}

/// The program's path, or returns from the test with a SKIPPED line.
macro_rules! require_program {
    ($name:expr) => {
        match find_program($name) {
            Some(p) => p,
            None => {
                eprintln!(
                    "SKIPPED {} ({}:{}): {} is not installed",
                    std::thread::current().name().unwrap_or("?"),
                    module_path!(),
                    line!(),
                    $name
                );
                return;
            }
        }
    };
}

/// A TCP port on 127.0.0.1 that was free a moment ago (bound to port 0,
/// then released).
fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Connects to 127.0.0.1:`port` with [`IO_TIMEOUT`] on reads and writes.
fn connect(port: u16) -> std::io::Result<TcpStream> {
    let s = TcpStream::connect(("127.0.0.1", port))?;
    s.set_read_timeout(Some(IO_TIMEOUT))?;
    s.set_write_timeout(Some(IO_TIMEOUT))?;
    s.set_nodelay(true)?;
    Ok(s)
}

/// Waits until something accepts connections on `port` (each probe is
/// closed at once); panics with `log` if `pid` dies or time runs out.
fn wait_listening(port: u16, pid: i32, log: &Path, what: &str) {
    let ok = wait_until(LISTEN_TIMEOUT, || !pid_alive(pid) || connect(port).is_ok());
    if !ok || !pid_alive(pid) {
        panic!(
            "{what}: nothing listens on 127.0.0.1:{port} (pid {pid} state {:?})\nlog {}:\n{}",
            proc_state(pid),
            log.display(),
            fs::read_to_string(log).unwrap_or_default()
        );
    }
}

/// inode -> state (hex, as in /proc/net/tcp: 0A is LISTEN) of every TCP
/// socket in `pid`'s network namespace.
fn tcp_socket_states(pid: i32) -> BTreeMap<u64, String> {
    let mut out = BTreeMap::new();
    for file in ["tcp", "tcp6"] {
        let text = fs::read_to_string(format!("/proc/{pid}/net/{file}")).unwrap_or_default();
        for line in text.lines().skip(1) {
            let f: Vec<&str> = line.split_whitespace().collect();
            if let (Some(st), Some(ino)) = (f.get(3), f.get(9).and_then(|s| s.parse::<u64>().ok())) {
                if ino != 0 {
                    out.insert(ino, (*st).to_owned());
                }
            }
        }
    }
    out
}

/// (pid, fd, state) of every TCP socket open in `pids` that is not a
/// listener.
fn open_tcp_connections(pids: &[i32]) -> Vec<(i32, String, String)> {
    let mut out = Vec::new();
    for &pid in pids {
        let states = tcp_socket_states(pid);
        let Ok(dir) = fs::read_dir(format!("/proc/{pid}/fd")) else { continue };
        for e in dir.flatten() {
            let Ok(target) = fs::read_link(e.path()) else { continue };
            let target = target.to_string_lossy().into_owned();
            let Some(ino) = target.strip_prefix("socket:[").and_then(|s| s.strip_suffix(']')) else { continue };
            if let Some(st) = ino.parse::<u64>().ok().and_then(|i| states.get(&i)) {
                if st != "0A" {
                    out.push((pid, e.file_name().to_string_lossy().into_owned(), st.clone()));
                }
            }
        }
    }
    out
}

/// Waits until the server processes `pids` have closed every TCP connection
/// (our clients are gone), so the dump sees only listeners.
fn wait_connections_closed(pids: &[i32], what: &str) {
    let mut left = Vec::new();
    let ok = wait_until(Duration::from_secs(10), || {
        left = open_tcp_connections(pids);
        left.is_empty()
    });
    assert!(ok, "{what}: connections still open in the server (pid, fd, state): {left:?}");
}

/// `floe restore --restore-detached --json` of a tree: registers the root
/// with `fx` and the whole restored tree with `guard`, asserts success and
/// returns the number of processes restore reported.
fn restore_tree(fx: &mut Fixture, guard: &mut TreeGuard, img: &Path) -> u64 {
    let out = restore_detached(img, &["--json"], Stdio::null());
    fx.adopt_restored();
    guard.add_tree(fx.pid);
    assert_ok(&out, &format!("restore of the {} tree (root {})", fx.name, fx.pid));
    let json = parse_json_stdout(&out);
    assert_eq!(json_pid(&json), fx.pid, "restore --json names another root: {json}");
    json.get("processes").and_then(serde_json::Value::as_u64).unwrap_or_else(|| panic!("no processes in {json}"))
}

/// Dumps the tree rooted at `fx` (floe kills it), reaps the root and waits
/// until the other original processes (`others`) have vanished, so every
/// pid is free for the restore.
fn dump_tree_and_wait(fx: &mut Fixture, img: &Path, others: &[i32]) {
    dump_and_reap(fx, img, &[]);
    wait_all_gone(others, ORIGINALS_GONE, "original tree after the dump");
}

/// Buffered request/response connection for the text protocols below.
struct Conn {
    r: BufReader<TcpStream>,
    w: BufWriter<TcpStream>,
}

impl Conn {
    fn open(port: u16) -> Self {
        let s = connect(port).unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"));
        Self { w: BufWriter::with_capacity(64 << 10, s.try_clone().unwrap()), r: BufReader::with_capacity(64 << 10, s) }
    }

    fn send(&mut self, data: &[u8]) {
        self.w.write_all(data).unwrap();
    }

    fn flush(&mut self) {
        self.w.flush().unwrap();
    }

    /// One CRLF-terminated line, without the CRLF; panics at EOF.
    fn line(&mut self) -> String {
        let mut v = Vec::new();
        let n = self.r.read_until(b'\n', &mut v).unwrap();
        assert!(n > 0 && v.ends_with(b"\r\n"), "connection closed or bad line: {:?}", String::from_utf8_lossy(&v));
        v.truncate(v.len() - 2);
        String::from_utf8(v).unwrap()
    }

    /// `n` bytes followed by CRLF.
    fn block(&mut self, n: usize) -> Vec<u8> {
        let mut v = vec![0; n + 2];
        self.r.read_exact(&mut v).unwrap();
        assert!(v.ends_with(b"\r\n"), "data block not followed by CRLF");
        v.truncate(n);
        v
    }

    /// Closes both directions (the server then closes its end).
    fn close(self) {
        let s = self.r.into_inner();
        let _ = s.shutdown(Shutdown::Both);
    }
}

// ---------------------------------------------------------------------------
// redis

/// One RESP reply.
#[derive(Debug, PartialEq)]
enum Reply {
    Simple(String),
    Error(String),
    Int(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

fn resp_command(args: &[&[u8]]) -> Vec<u8> {
    let mut v = format!("*{}\r\n", args.len()).into_bytes();
    for a in args {
        v.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
        v.extend_from_slice(a);
        v.extend_from_slice(b"\r\n");
    }
    v
}

fn read_reply(c: &mut Conn) -> Reply {
    let line = c.line();
    let (kind, rest) = line.split_at(1);
    let num = || rest.parse::<i64>().unwrap_or_else(|_| panic!("bad RESP length in {line:?}"));
    match kind {
        "+" => Reply::Simple(rest.to_owned()),
        "-" => Reply::Error(rest.to_owned()),
        ":" => Reply::Int(num()),
        "$" => Reply::Bulk((num() >= 0).then(|| c.block(num() as usize))),
        "*" => Reply::Array((num() >= 0).then(|| (0..num()).map(|_| read_reply(c)).collect())),
        _ => panic!("unexpected RESP reply {line:?}"),
    }
}

/// Sends one command and reads its reply.
fn redis(c: &mut Conn, args: &[&[u8]]) -> Reply {
    c.send(&resp_command(args));
    c.flush();
    read_reply(c)
}

fn redis_dbsize(c: &mut Conn) -> i64 {
    match redis(c, &[b"DBSIZE"]) {
        Reply::Int(n) => n,
        r => panic!("DBSIZE answered {r:?}"),
    }
}

/// Pipelined GETs of `keys`: the value of each (None when missing).
fn redis_get_many(c: &mut Conn, keys: &[u64]) -> Vec<Option<Vec<u8>>> {
    let mut out = Vec::with_capacity(keys.len());
    for chunk in keys.chunks(500) {
        for k in chunk {
            c.send(&resp_command(&[b"GET", format!("k:{k}").as_bytes()]));
        }
        c.flush();
        for _ in chunk {
            match read_reply(c) {
                Reply::Bulk(v) => out.push(v),
                r => panic!("GET answered {r:?}"),
            }
        }
    }
    out
}

/// `redis-server` in the foreground with 100k keys loaded by pipelined SETs:
/// dumped with no client connected, restored with the same pid and threads;
/// DBSIZE is 100000, 2000 random keys hold their values, and a new SET/GET
/// works.
#[test]
fn real_redis_keeps_100k_keys() {
    require_root!();
    let redis_server = require_program!("redis-server");
    const KEYS: u64 = 100_000;
    let td = TestDir::new("redis");
    let img = td.join("img");
    let data = td.join("data");
    fs::create_dir(&data).unwrap();
    let port = free_port();
    let mut guard = TreeGuard::new();
    let mut fx = Spawn::program("redis", &redis_server, td.path())
        .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
        .args(["--daemonize", "no", "--dir"])
        .arg(&data)
        .spawn();
    let pid = fx.pid;
    guard.add_tree(pid);
    wait_listening(port, pid, &fx.log, "redis-server at start");

    let started = Instant::now();
    let mut c = Conn::open(port);
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(1000) {
        for i in chunk {
            c.send(&resp_command(&[b"SET", format!("k:{i}").as_bytes(), format!("v:{i}").as_bytes()]));
        }
        c.flush();
        for i in chunk {
            let r = read_reply(&mut c);
            assert_eq!(r, Reply::Simple("OK".into()), "SET k:{i}");
        }
    }
    assert_eq!(redis_dbsize(&mut c), KEYS as i64, "DBSIZE after loading");
    eprintln!("loaded {KEYS} keys in {:.2?}", started.elapsed());
    c.close();
    wait_connections_closed(&[pid], "redis before the dump");
    let tids = tids_of(pid);
    eprintln!("redis-server threads: {tids:?}");
    assert!(tids.len() > 1, "redis-server should run background threads: {tids:?}");

    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    guard.add_tree(pid);
    assert_eq!(tids_of(pid), tids, "restored redis-server has other threads");
    wait_listening(port, pid, &fx.log, "restored redis-server");

    let mut c = Conn::open(port);
    assert_eq!(redis_dbsize(&mut c), KEYS as i64, "DBSIZE after the restore");
    let mut seed = 0x5eed_u64;
    let mut sample: Vec<u64> = (0..2000).map(|_| xorshift(&mut seed) % KEYS).collect();
    sample.extend([0, KEYS - 1]);
    let got = redis_get_many(&mut c, &sample);
    for (k, v) in sample.iter().zip(&got) {
        assert_eq!(v.as_deref(), Some(format!("v:{k}").as_bytes()), "GET k:{k} after the restore");
    }
    assert_eq!(redis(&mut c, &[b"SET", b"after", b"restore"]), Reply::Simple("OK".into()), "SET after the restore");
    assert_eq!(redis(&mut c, &[b"GET", b"after"]), Reply::Bulk(Some(b"restore".to_vec())), "GET after the restore");
    assert_eq!(redis_dbsize(&mut c), KEYS as i64 + 1, "DBSIZE after a new SET");
    c.close();
    assert!(pid_alive(pid), "redis-server died after serving:\n{}", fx.log_contents());
}

// ---------------------------------------------------------------------------
// memcached

fn mc_value(i: u64) -> String {
    format!("value-{i}-{}", "x".repeat((i % 50) as usize))
}

/// Pipelined `get` of `keys` (100 per command): key -> value.
fn mc_get_many(c: &mut Conn, keys: &[u64]) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for chunk in keys.chunks(100) {
        let mut cmd = String::from("get");
        for k in chunk {
            cmd.push_str(&format!(" k:{k}"));
        }
        cmd.push_str("\r\n");
        c.send(cmd.as_bytes());
        c.flush();
        loop {
            let line = c.line();
            if line == "END" {
                break;
            }
            let f: Vec<&str> = line.split(' ').collect();
            assert!(f.len() >= 4 && f[0] == "VALUE", "unexpected get reply {line:?}");
            let v = c.block(f[3].parse().unwrap());
            out.insert(f[1].to_owned(), String::from_utf8(v).unwrap());
        }
    }
    out
}

/// The `stats` value of `key`.
fn mc_stat(c: &mut Conn, key: &str) -> String {
    c.send(b"stats\r\n");
    c.flush();
    let mut found = None;
    loop {
        let line = c.line();
        if line == "END" {
            break;
        }
        if let Some(v) = line.strip_prefix(&format!("STAT {key} ")) {
            found = Some(v.to_owned());
        }
    }
    found.unwrap_or_else(|| panic!("memcached stats has no {key}"))
}

/// `memcached -t 4` with 10k keys set over the text protocol: dumped with
/// no client connected; after the restore all keys read back, curr_items is
/// unchanged, and a new key can be set and read.
#[test]
fn real_memcached_keeps_10k_keys() {
    require_root!();
    let memcached = require_program!("memcached");
    const KEYS: u64 = 10_000;
    let td = TestDir::new("memcached");
    let img = td.join("img");
    let port = free_port();
    let mut guard = TreeGuard::new();
    let mut fx = Spawn::program("memcached", &memcached, td.path())
        .args(["-p", &port.to_string(), "-l", "127.0.0.1", "-U", "0", "-t", "4", "-m", "64", "-u", "root"])
        .spawn();
    let pid = fx.pid;
    guard.add_tree(pid);
    wait_listening(port, pid, &fx.log, "memcached at start");

    let mut c = Conn::open(port);
    for chunk in (0..KEYS).collect::<Vec<_>>().chunks(500) {
        for &i in chunk {
            let v = mc_value(i);
            c.send(format!("set k:{i} {} 0 {}\r\n{v}\r\n", i % 7, v.len()).as_bytes());
        }
        c.flush();
        for i in chunk {
            assert_eq!(c.line(), "STORED", "set k:{i}");
        }
    }
    assert_eq!(mc_stat(&mut c, "curr_items"), KEYS.to_string(), "curr_items after loading");
    c.close();
    wait_connections_closed(&[pid], "memcached before the dump");
    let tids = tids_of(pid);
    eprintln!("memcached threads: {} {tids:?}", tids.len());
    assert!(tids.len() >= 5, "memcached -t 4 should run at least 5 threads: {tids:?}");

    dump_and_reap(&mut fx, &img, &[]);
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    guard.add_tree(pid);
    assert_eq!(tids_of(pid), tids, "restored memcached has other threads");
    wait_listening(port, pid, &fx.log, "restored memcached");

    let mut c = Conn::open(port);
    let all: Vec<u64> = (0..KEYS).collect();
    let got = mc_get_many(&mut c, &all);
    let missing: Vec<&u64> = all.iter().filter(|i| !got.contains_key(&format!("k:{i}"))).take(10).collect();
    assert!(missing.is_empty(), "{} keys missing after the restore, e.g. {missing:?}", KEYS as usize - got.len());
    for i in 0..KEYS {
        assert_eq!(got[&format!("k:{i}")], mc_value(i), "value of k:{i}");
    }
    assert_eq!(mc_stat(&mut c, "curr_items"), KEYS.to_string(), "curr_items after the restore");
    c.send(b"set after 0 0 7\r\nrestore\r\n");
    c.flush();
    assert_eq!(c.line(), "STORED", "set after the restore");
    c.send(b"get after\r\n");
    c.flush();
    assert_eq!(c.line(), "VALUE after 0 7");
    assert_eq!(c.block(7), b"restore");
    assert_eq!(c.line(), "END");
    c.close();
    assert!(pid_alive(pid), "memcached died after serving:\n{}", fx.log_contents());
}

// ---------------------------------------------------------------------------
// nginx

/// `GET path` over HTTP/1.0 (the server closes the connection): the status
/// line and the body.
fn http_get(port: u16, path: &str) -> (String, Vec<u8>) {
    let mut s = connect(port).unwrap_or_else(|e| panic!("cannot connect to 127.0.0.1:{port}: {e}"));
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: localhost\r\n\r\n").as_bytes()).unwrap();
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).unwrap();
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").unwrap_or_else(|| {
        panic!("GET {path}: no end of headers in {:?}", String::from_utf8_lossy(&resp[..resp.len().min(500)]))
    });
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head.lines().next().unwrap_or_default().to_owned();
    (status, resp[split + 4..].to_vec())
}

/// `[alert]`, `[crit]` and `[emerg]` lines of an nginx error log.
fn nginx_serious_errors(log: &Path) -> Vec<String> {
    fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| ["[alert]", "[crit]", "[emerg]"].iter().any(|t| l.contains(t)))
        .map(str::to_owned)
        .collect()
}

/// nginx master + 2 workers running as root (`user root root;`) serving a
/// static directory: see [`nginx_round_trip`].
#[test]
fn real_nginx_master_and_workers() {
    nginx_round_trip("root root");
}

/// The same with nginx's default for a root master: workers switched to
/// nobody (`user nobody nogroup;`), so the tree mixes uids.
#[test]
fn real_nginx_workers_as_nobody() {
    nginx_round_trip("nobody nogroup");
}

/// nginx master + 2 workers (as `user`) serving a static directory: dumped
/// as a tree with no client connected; after the restore the master and
/// workers have their pids, parent and uids, the same files are served,
/// and a graceful SIGQUIT (sent to the workers through the master's
/// socketpair channels) ends the whole tree cleanly.
fn nginx_round_trip(user: &str) {
    require_root!();
    let nginx = require_program!("nginx");
    let td = TestDir::new(&format!("nginx-{}", user.split(' ').next().unwrap_or("x")));
    let dir = td.path();
    // Workers may run as nobody: they must be able to read the served files.
    fs::set_permissions(dir, fs::Permissions::from_mode(0o755)).unwrap();
    let img = td.join("img");
    let www = td.join("www");
    fs::create_dir_all(&www).unwrap();
    fs::write(www.join("index.html"), "<html><body>floe nginx test</body></html>\n").unwrap();
    write_pattern_file(&www.join("data.bin"), 300_000, 77);
    let data = fs::read(www.join("data.bin")).unwrap();
    let port = free_port();
    let d = dir.display();
    let conf = format!(
        "worker_processes 2;\n\
         user {user};\n\
         error_log {d}/error.log info;\n\
         pid {d}/nginx.pid;\n\
         events {{ worker_connections 64; }}\n\
         http {{\n\
         \x20   access_log off;\n\
         \x20   client_body_temp_path {d}/tmp/body;\n\
         \x20   proxy_temp_path {d}/tmp/proxy;\n\
         \x20   fastcgi_temp_path {d}/tmp/fastcgi;\n\
         \x20   uwsgi_temp_path {d}/tmp/uwsgi;\n\
         \x20   scgi_temp_path {d}/tmp/scgi;\n\
         \x20   server {{ listen 127.0.0.1:{port}; root {d}/www; }}\n\
         }}\n"
    );
    fs::create_dir_all(td.join("tmp")).unwrap();
    let conf_path = td.join("nginx.conf");
    fs::write(&conf_path, conf).unwrap();
    let error_log = td.join("error.log");

    let mut guard = TreeGuard::new();
    let mut fx = Spawn::program("nginx", &nginx, dir)
        .arg("-p")
        .arg(dir)
        .arg("-c")
        .arg(&conf_path)
        .arg("-e")
        .arg(&error_log)
        .args(["-g", "daemon off; master_process on;"])
        .spawn();
    let master = fx.pid;
    wait_listening(port, master, &fx.log, "nginx at start");
    let mut workers = Vec::new();
    assert!(
        wait_until(Duration::from_secs(10), || {
            workers = children_of(master);
            workers.len() == 2
        }),
        "nginx master {master} should have 2 workers: {workers:?}\nerror.log:\n{}",
        fs::read_to_string(&error_log).unwrap_or_default()
    );
    guard.add_tree(master);
    let uid = |p: i32| status_field(p, "Uid").unwrap_or_default();
    let uids: Vec<String> = workers.iter().map(|&w| uid(w)).collect();
    eprintln!("nginx master {master} (uid {}), workers {workers:?} (uids {uids:?})", uid(master));

    let (st, body) = http_get(port, "/data.bin");
    assert!(st.contains(" 200 "), "GET /data.bin before the dump: {st}");
    assert!(body == data, "GET /data.bin before the dump: wrong body ({} bytes)", body.len());
    let (st, index) = http_get(port, "/");
    assert!(st.contains(" 200 "), "GET / before the dump: {st}");
    wait_connections_closed(&[master, workers[0], workers[1]], "nginx before the dump");

    dump_tree_and_wait(&mut fx, &img, &workers);
    let n = restore_tree(&mut fx, &mut guard, &img);
    assert_eq!(n, 3, "master and two workers");
    assert_eq!(children_of(master), workers, "workers of the restored master");
    for (&w, u) in workers.iter().zip(&uids) {
        let ids = proc_ids_of(w, "restored worker");
        assert_eq!(ids.ppid, master, "parent of worker {w}");
        assert_eq!(&uid(w), u, "uids of worker {w}");
    }
    wait_listening(port, master, &fx.log, "restored nginx");
    for round in 0..4 {
        let (st, body) = http_get(port, "/data.bin");
        assert!(st.contains(" 200 "), "GET /data.bin #{round} after the restore: {st}");
        assert!(body == data, "GET /data.bin #{round} after the restore: wrong body ({} bytes)", body.len());
    }
    let (st, index2) = http_get(port, "/");
    assert!(st.contains(" 200 ") && index2 == index, "GET / after the restore: {st}");
    for p in [master, workers[0], workers[1]] {
        assert!(pid_alive(p), "nginx process {p} died after serving (state {:?})", proc_state(p));
    }

    // Graceful shutdown: the master tells its workers through the channels.
    send_signal(master, libc::SIGQUIT).unwrap();
    wait_all_gone(&[master, workers[0], workers[1]], Duration::from_secs(15), "nginx after SIGQUIT");
    assert!(!td.join("nginx.pid").exists(), "the master did not remove its pid file on SIGQUIT");
    let serious = nginx_serious_errors(&error_log);
    assert!(
        serious.is_empty(),
        "nginx logged serious errors:\n{}\nfull log:\n{}",
        serious.join("\n"),
        fs::read_to_string(&error_log).unwrap_or_default()
    );
}

// ---------------------------------------------------------------------------
// python3

/// Three threads, each appending "t<i> <n>" to its own file every 20 ms.
const PY_THREADS: &str = "import os, sys, threading, time\n\
                          d = sys.argv[1]\n\
                          def work(i):\n\
                          \x20   f = open(os.path.join(d, 't%d.txt' % i), 'a', buffering=1)\n\
                          \x20   n = 0\n\
                          \x20   while True:\n\
                          \x20       f.write('t%d %d\\n' % (i, n))\n\
                          \x20       n += 1\n\
                          \x20       time.sleep(0.02)\n\
                          ts = [threading.Thread(target=work, args=(i,), name='w%d' % i) for i in range(3)]\n\
                          for t in ts:\n\
                          \x20   t.start()\n\
                          for t in ts:\n\
                          \x20   t.join()\n";

/// A threaded python3 program dumped and restored twice (the second dump
/// takes the restored process): same thread ids, and every file continues
/// without a gap or a repeat.
#[test]
fn real_python_threads_twice() {
    require_root!();
    let td = TestDir::new("python-twice");
    let mut fx =
        Spawn::program("python-threads", python3(), td.path()).arg("-c").arg(PY_THREADS).arg(td.path()).spawn();
    let pid = fx.pid;
    let file = |i: usize| td.join(format!("t{i}.txt"));
    let nums = |i: usize| numbered_lines(&file(i), &format!("t{i} "));
    let counts = || (0..3).map(|i| nums(i).len()).collect::<Vec<_>>();
    assert!(
        wait_until(Duration::from_secs(10), || counts().iter().all(|&n| n >= 5)),
        "python threads are not writing:\n{}",
        fx.log_contents()
    );
    let tids = tids_of(pid);
    assert_eq!(tids.len(), 4, "main thread + 3 workers: {tids:?}");

    for round in 1..=2 {
        let img = td.join(format!("img{round}"));
        if round == 1 {
            dump_and_reap(&mut fx, &img, &[]);
        } else {
            // The restored process is not our child: floe kills it, PID 1 reaps it.
            assert_ok(&dump(pid, &img, &[]), "second dump (of the restored python)");
            assert!(wait_pid_gone(pid, ORIGINALS_GONE), "restored python still there after the second dump");
        }
        let at_dump = counts();
        restore_and_adopt(&mut fx, &img, &[], Stdio::null());
        assert_eq!(tids_of(pid), tids, "thread ids changed (round {round})");
        assert!(
            wait_until(Duration::from_secs(10), || counts().iter().zip(&at_dump).all(|(n, a)| *n >= a + 20)),
            "restored python threads stopped writing (round {round}: at dump {at_dump:?}, now {:?}; state {:?}):\n{}",
            counts(),
            proc_state(pid),
            fx.log_contents()
        );
        eprintln!("round {round}: lines at the dump {at_dump:?}, now {:?}", counts());
    }
    for i in 0..3 {
        let all = nums(i);
        let expected: Vec<u64> = (0..all.len() as u64).collect();
        assert_eq!(all, expected, "t{i}.txt must continue without gaps or repeats");
        let text = fs::read_to_string(file(i)).unwrap();
        assert!(text.ends_with('\n') && text.lines().count() == all.len(), "t{i}.txt has a torn or foreign line");
    }
    assert!(fx.log_contents().is_empty(), "python complained:\n{}", fx.log_contents());
}

// ---------------------------------------------------------------------------
// tar

/// Flags that make a tar archive independent of who made it and when.
const TAR_DETERMINISTIC: [&str; 5] = ["--sort=name", "--mtime=@0", "--owner=0", "--group=0", "--numeric-owner"];

/// Fills `src` with 48 files of 2 to 4 MiB (~150 MB) in 4 directories:
/// rotations of one pseudo-random MiB with a per-file header. Returns the
/// total size.
fn make_tar_source(src: &Path) -> u64 {
    const BASE: usize = 1 << 20;
    let mut s = 0x7a5_u64;
    let mut base = Vec::with_capacity(BASE);
    while base.len() < BASE {
        base.extend_from_slice(&xorshift(&mut s).to_le_bytes());
    }
    let mut total = 0;
    for i in 0..48usize {
        let d = src.join(format!("dir{}", i % 4));
        fs::create_dir_all(&d).unwrap();
        let size = (2 << 20) + (i * 7 % 17) * (128 << 10) + i * 13;
        let mut out = BufWriter::with_capacity(1 << 20, fs::File::create(d.join(format!("file{i:02}.dat"))).unwrap());
        let mut written = 0;
        let mut k = 0;
        while written < size {
            let rot = (i * 7919 + k * 104_729) % BASE;
            let header = format!("file {i} chunk {k}\n");
            for part in [header.as_bytes(), &base[rot..], &base[..rot]] {
                let n = part.len().min(size - written);
                out.write_all(&part[..n]).unwrap();
                written += n;
            }
            k += 1;
        }
        out.flush().unwrap();
        total += size as u64;
    }
    total
}

/// Whether two files have identical contents (compared in 1 MiB pieces).
fn same_contents(a: &Path, b: &Path) -> Result<(), String> {
    let (la, lb) = (fs::metadata(a).unwrap().len(), fs::metadata(b).unwrap().len());
    if la != lb {
        return Err(format!("{} is {la} bytes, {} is {lb}", a.display(), b.display()));
    }
    let (mut fa, mut fb) = (BufReader::new(fs::File::open(a).unwrap()), BufReader::new(fs::File::open(b).unwrap()));
    let (mut ba, mut bb) = (vec![0u8; 1 << 20], vec![0u8; 1 << 20]);
    let mut off = 0u64;
    while off < la {
        let n = (la - off).min(1 << 20) as usize;
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        if ba[..n] != bb[..n] {
            let i = ba[..n].iter().zip(&bb[..n]).position(|(x, y)| x != y).unwrap_or(0);
            return Err(format!("first difference at byte {}", off + i as u64));
        }
        off += n as u64;
    }
    Ok(())
}

/// `tar -cf OUT.tar -C SRC .` of ~150 MB dumped mid-way (tar sleeps 1 s
/// every ~30 MB through `--checkpoint-action=sleep=1`, which does not change
/// the archive, so the dump reliably lands in the middle): after the
/// restore tar finishes, says nothing, and OUT.tar is byte-identical to an
/// uninterrupted run.
#[test]
fn real_tar_archive_identical_after_restore() {
    require_root!();
    let tar = require_program!("tar");
    let td = TestDir::new("tar");
    let img = td.join("img");
    let src = td.join("src");
    let (out_tar, ref_tar) = (td.join("OUT.tar"), td.join("REF.tar"));
    let started = Instant::now();
    let total = make_tar_source(&src);
    eprintln!("generated {total} bytes in {:.2?}", started.elapsed());

    let started = Instant::now();
    let r = Command::new(&tar)
        .args(TAR_DETERMINISTIC)
        .arg("-cf")
        .arg(&ref_tar)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert!(r.status.success(), "reference tar failed: {}", String::from_utf8_lossy(&r.stderr));
    eprintln!("uninterrupted tar: {:.2?}", started.elapsed());

    let mut fx = Spawn::program("tar", &tar, td.path())
        .args(TAR_DETERMINISTIC)
        .args(["--checkpoint=3000", "--checkpoint-action=sleep=1", "-cf"])
        .arg(&out_tar)
        .arg("-C")
        .arg(&src)
        .arg(".")
        .spawn();
    let pid = fx.pid;
    let size = || fs::metadata(&out_tar).map(|m| m.len()).unwrap_or(0);
    assert!(
        wait_until(Duration::from_secs(20), || size() >= 40 << 20 || !pid_alive(pid)),
        "tar does not progress (OUT.tar {} bytes):\n{}",
        size(),
        fx.log_contents()
    );
    assert!(fx.child_running(), "tar finished before it could be dumped:\n{}", fx.log_contents());
    let wchan = fs::read_to_string(format!("/proc/{pid}/wchan")).unwrap_or_default();
    dump_and_reap(&mut fx, &img, &[]);
    let at_dump = size();
    eprintln!("dumped tar at {at_dump} of {} bytes (wchan {wchan:?})", fs::metadata(&ref_tar).unwrap().len());
    assert!(at_dump < fs::metadata(&ref_tar).unwrap().len(), "OUT.tar was complete at the dump");

    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    assert!(
        wait_pid_gone(pid, Duration::from_secs(30)),
        "restored tar did not finish (OUT.tar {} bytes, state {:?}):\n{}",
        size(),
        proc_state(pid),
        fx.log_contents()
    );
    assert!(fx.log_contents().is_empty(), "tar complained:\n{}", fx.log_contents());
    if let Err(e) = same_contents(&out_tar, &ref_tar) {
        panic!("OUT.tar differs from the uninterrupted run: {e}");
    }
}

// ---------------------------------------------------------------------------
// git

/// A `git fast-import` stream of `commits` commits on refs/heads/master:
/// commit i adds data/fNNN.bin (24 KiB pseudo-random, so the pack is ~7 MB)
/// and rewrites log.txt.
fn fast_import_stream(commits: usize) -> Vec<u8> {
    let mut out = Vec::new();
    let mut log = String::new();
    let mut s = 0x917_u64;
    for i in 0..commits {
        let mut blob = Vec::with_capacity(24 << 10);
        while blob.len() < 24 << 10 {
            blob.extend_from_slice(&xorshift(&mut s).to_le_bytes());
        }
        log.push_str(&format!("commit {i}\n"));
        let msg = format!("commit {i}");
        out.extend_from_slice(
            format!(
                "commit refs/heads/master\nmark :{}\ncommitter Floe Test <floe@example.invalid> {} +0000\ndata {}\n{msg}\n",
                i + 1,
                1_000_000_000 + i * 60,
                msg.len()
            )
            .as_bytes(),
        );
        if i > 0 {
            out.extend_from_slice(format!("from :{i}\n").as_bytes());
        }
        out.extend_from_slice(format!("M 100644 inline data/f{i:03}.bin\ndata {}\n", blob.len()).as_bytes());
        out.extend_from_slice(&blob);
        out.extend_from_slice(format!("\nM 100644 inline log.txt\ndata {}\n{log}\n", log.len()).as_bytes());
    }
    out
}

/// Runs `git ARGS` (with `home` as HOME and no system config) and returns
/// its stdout; panics on failure.
fn git_ok(git: &Path, home: &Path, args: &[&std::ffi::OsStr], stdin: Option<&[u8]>) -> String {
    let mut cmd = Command::new(git);
    cmd.args(args)
        .env("HOME", home)
        .env("GIT_CONFIG_NOSYSTEM", "1")
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().unwrap();
    if let Some(data) = stdin {
        let mut w = child.stdin.take().unwrap();
        let data = data.to_vec();
        let t = std::thread::spawn(move || w.write_all(&data));
        let out = child.wait_with_output().unwrap();
        t.join().unwrap().unwrap();
        assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
        return String::from_utf8_lossy(&out.stdout).into_owned();
    }
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "git {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Copies stdin to stdout at most 16 KiB per 5 ms (~3 MB/s).
const THROTTLE_PY: &str = "import os, time\n\
                           while True:\n\
                           \x20   b = os.read(0, 16384)\n\
                           \x20   if not b:\n\
                           \x20       break\n\
                           \x20   while b:\n\
                           \x20       b = b[os.write(1, b):]\n\
                           \x20   time.sleep(0.005)\n";

/// `git clone` of a local repository of 300 commits (~7 MB pack), dumped
/// mid-transfer, restored, and finishing: fsck passes, HEAD and the commit
/// count match, the work tree is clean.
///
/// A plain local clone (`git clone --no-hardlinks SRC DST`) copies the
/// object files directly and takes ~60 ms here: far too fast to dump
/// mid-way reliably. So the clone goes through the git protocol
/// (`--no-local`) with an upload-pack wrapper whose output passes through a
/// throttle (~3 MB/s): the clone takes ~2.5 s, and the dump catches a tree
/// of 7 processes connected by pipes: git clone (with its sideband thread),
/// index-pack, sh -c, the wrapper sh, git upload-pack, git pack-objects and
/// the python3 throttle.
#[test]
fn real_git_clone_completes_after_restore() {
    require_root!();
    let git = require_program!("git");
    let td = TestDir::new("git-clone");
    let img = td.join("img");
    let (src, dst) = (td.join("src.git"), td.join("dst"));
    let home = td.path();
    let os = |s: &str| std::ffi::OsString::from(s);
    let started = Instant::now();
    git_ok(&git, home, &[&os("init"), &os("-q"), &os("--bare"), src.as_os_str()], None);
    let stream = fast_import_stream(300);
    git_ok(&git, home, &[&os("-C"), src.as_os_str(), &os("fast-import"), &os("--quiet")], Some(&stream));
    git_ok(&git, home, &[&os("-C"), src.as_os_str(), &os("symbolic-ref"), &os("HEAD"), &os("refs/heads/master")], None);
    let head = git_ok(&git, home, &[&os("-C"), src.as_os_str(), &os("rev-parse"), &os("HEAD")], None);
    eprintln!("source repository ready in {:.2?}, HEAD {}", started.elapsed(), head.trim());

    let throttle = td.join("throttle.py");
    fs::write(&throttle, THROTTLE_PY).unwrap();
    let wrapper = td.join("slow-upload-pack");
    let q = |p: &Path| format!("'{}'", p.display());
    fs::write(&wrapper, format!("#!/bin/sh\n{} upload-pack \"$@\" | {} {}\n", q(&git), q(&python3()), q(&throttle)))
        .unwrap();
    fs::set_permissions(&wrapper, fs::Permissions::from_mode(0o755)).unwrap();

    let mut guard = TreeGuard::new();
    let mut fx = Spawn::program("git-clone", "env", td.path())
        .arg(format!("HOME={}", home.display()))
        .arg("GIT_CONFIG_NOSYSTEM=1")
        .arg(&git)
        .args(["clone", "-q", "--no-hardlinks", "--no-local"])
        .arg(format!("--upload-pack={}", wrapper.display()))
        .arg(&src)
        .arg(&dst)
        .spawn();
    let pid = fx.pid;
    let pack_dir = dst.join(".git/objects/pack");
    let tmp_pack_size = || -> u64 {
        fs::read_dir(&pack_dir)
            .map(|d| {
                d.flatten()
                    .filter(|e| e.file_name().to_string_lossy().starts_with("tmp_pack_"))
                    .filter_map(|e| e.metadata().ok())
                    .map(|m| m.len())
                    .sum()
            })
            .unwrap_or(0)
    };
    let mut tree = Vec::new();
    assert!(
        wait_until(Duration::from_secs(15), || {
            tree = descendants_of(pid);
            guard.add_all(&tree);
            (tmp_pack_size() >= 1 << 20 && tree.len() >= 6) || !pid_alive(pid)
        }),
        "the clone does not progress (pack {} bytes, descendants {tree:?}):\n{}",
        tmp_pack_size(),
        fx.log_contents()
    );
    guard.add_tree(pid);
    let tree = descendants_of(pid);
    let comms: Vec<String> = tree
        .iter()
        .map(|p| fs::read_to_string(format!("/proc/{p}/comm")).unwrap_or_default().trim().to_owned())
        .collect();
    eprintln!("dumping git clone {pid} with {tree:?} {comms:?} at {} pack bytes", tmp_pack_size());
    assert!(fx.child_running(), "the clone finished before it could be dumped:\n{}", fx.log_contents());

    dump_tree_and_wait(&mut fx, &img, &tree);
    let at_dump = tmp_pack_size();
    let n = restore_tree(&mut fx, &mut guard, &img);
    assert_eq!(n as usize, 1 + tree.len(), "restored processes (git clone and {tree:?})");
    assert!(
        wait_pid_gone(pid, Duration::from_secs(30)),
        "restored git clone did not finish (pack {} bytes, was {at_dump} at the dump; state {:?}):\n{}",
        tmp_pack_size(),
        proc_state(pid),
        fx.log_contents()
    );
    wait_all_gone(&tree, ORIGINALS_GONE, "restored clone helpers after the clone");
    let log = fx.log_contents();
    assert!(!log.contains("fatal") && !log.contains("error"), "git clone complained:\n{log}");

    git_ok(&git, home, &[&os("-C"), dst.as_os_str(), &os("fsck"), &os("--strict"), &os("--no-progress")], None);
    let head2 = git_ok(&git, home, &[&os("-C"), dst.as_os_str(), &os("rev-parse"), &os("HEAD")], None);
    assert_eq!(head2, head, "HEAD of the clone");
    let count = git_ok(&git, home, &[&os("-C"), dst.as_os_str(), &os("rev-list"), &os("--count"), &os("HEAD")], None);
    assert_eq!(count.trim(), "300", "commits in the clone");
    let status = git_ok(&git, home, &[&os("-C"), dst.as_os_str(), &os("status"), &os("--porcelain")], None);
    assert!(status.is_empty(), "the clone's work tree is not clean:\n{status}");
    assert_eq!(fs::read_dir(dst.join("data")).unwrap().count(), 300, "files checked out");
}

// ---------------------------------------------------------------------------
// ping

/// icmp_seq of every reply line ping printed.
fn ping_seqs(log: &str) -> Vec<u64> {
    log.lines()
        .filter(|l| l.contains("bytes from 127.0.0.1"))
        .filter_map(|l| l.split("icmp_seq=").nth(1)?.split_whitespace().next()?.parse().ok())
        .collect()
}

/// `ping` (iputils; as root it uses raw ICMP and ICMPv6 sockets with ICMP
/// type filters) pinging 127.0.0.1 every 50 ms is dumped and restored: it
/// goes on with the next sequence number, every echo is answered (no gap),
/// and its summary at SIGINT counts no loss beyond the one echo a SIGINT
/// may catch in flight.
#[test]
fn real_ping_goes_on_without_loss() {
    require_root!();
    let ping = require_program!("ping");
    let td = TestDir::new("ping");
    let mut fx = Spawn::program("ping", &ping, td.path()).args(["-n", "-i", "0.05", "127.0.0.1"]).spawn();
    let pid = fx.pid;
    assert!(
        wait_until(Duration::from_secs(10), || ping_seqs(&fx.log_contents()).len() >= 5),
        "ping is not answered:\n{}",
        fx.log_contents()
    );
    let img = td.join("img");
    // A freeze between an echo and ping reading its answer leaves the
    // answer queued, and such a dump is refused: try again.
    let mut refused = Vec::new();
    loop {
        let out = dump(pid, &img, &[]);
        if out.status.success() {
            break;
        }
        let err = stderr_text(&out);
        assert!(err.contains("waiting to be read") && refused.len() < 5, "dump of ping failed: {err}");
        refused.push(err);
    }
    fx.reap(Duration::from_secs(10));
    let at_dump = ping_seqs(&fx.log_contents()).len();
    restore_and_adopt(&mut fx, &img, &[], Stdio::null());
    assert!(
        wait_until(Duration::from_secs(10), || ping_seqs(&fx.log_contents()).len() >= at_dump + 20),
        "restored ping is not answered (replies at the dump {at_dump}):\n{}",
        fx.log_contents()
    );
    send_signal(pid, libc::SIGINT).unwrap();
    assert!(
        wait_until(Duration::from_secs(10), || fx.log_contents().contains("packets transmitted")),
        "no summary from ping:\n{}",
        fx.log_contents()
    );
    let log = fx.log_contents();
    let seqs = ping_seqs(&log);
    let expected: Vec<u64> = (seqs[0]..seqs[0] + seqs.len() as u64).collect();
    assert_eq!(seqs, expected, "icmp_seq of the replies has a gap or a repeat:\n{log}");
    let summary = log.lines().find(|l| l.contains("packets transmitted")).unwrap();
    let n: Vec<u64> = summary.split(|c: char| !c.is_ascii_digit()).filter_map(|t| t.parse().ok()).collect();
    assert!(n.len() >= 2 && n[0] >= n[1] && n[0] - n[1] <= 1, "ping counted losses: {summary}");
    eprintln!("{summary} (dumps refused first: {})", refused.len());
}
