//! Process-level syscalls: creating the restore stub, limits, signals.
use super::cvt;
use std::io;

#[repr(C)]
#[derive(Default)]
struct CloneArgs {
    flags: u64,
    pidfd: u64,
    child_tid: u64,
    parent_tid: u64,
    exit_signal: u64,
    stack: u64,
    stack_size: u64,
    tls: u64,
    set_tid: u64,
    set_tid_size: u64,
    cgroup: u64,
}
const _: () = assert!(std::mem::size_of::<CloneArgs>() == 88);

/// Creates the restore stub: a child with exactly `pid` that asks to be
/// killed when its parent dies and then waits in pause(2) forever.
///
/// The child runs only raw syscalls, so this is safe to call from a
/// multi-threaded process.
pub fn spawn_stub(pid: i32) -> io::Result<i32> {
    let tid: [i32; 1] = [pid];
    let parent = std::process::id() as libc::c_long;
    let args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: clone3 without CLONE_VM duplicates the address space, so the
    // child owns a private copy of `args` and `tid`. The child branch below
    // only issues raw syscalls and never returns.
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if r == 0 {
        // SAFETY: child side of clone3: only async-signal-safe raw syscalls, never returns.
        unsafe {
            libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            if libc::syscall(libc::SYS_getppid) != parent {
                libc::syscall(libc::SYS_exit_group, 1);
            }
            loop {
                libc::syscall(libc::SYS_pause);
            }
        }
    }
    cvt(r).map(|p| p as i32)
}

/// Reads a resource limit of another process.
pub fn get_rlimit(pid: i32, resource: u32) -> io::Result<(u64, u64)> {
    let mut old = libc::rlimit64 { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: `old` is a valid out pointer; no new limit is passed.
    let r = unsafe { libc::prlimit64(pid, resource as _, std::ptr::null(), &mut old) };
    cvt(r as libc::c_long)?;
    Ok((old.rlim_cur, old.rlim_max))
}

/// Sets a resource limit of another process.
pub fn set_rlimit(pid: i32, resource: u32, cur: u64, max: u64) -> io::Result<()> {
    let new = libc::rlimit64 { rlim_cur: cur, rlim_max: max };
    // SAFETY: `new` is a valid pointer for reading; no old value is requested.
    let r = unsafe { libc::prlimit64(pid, resource as _, &new, std::ptr::null_mut()) };
    cvt(r as libc::c_long).map(drop)
}

/// Reads another thread's robust futex list head and length.
pub fn get_robust_list(tid: i32) -> io::Result<(u64, u64)> {
    let mut head: u64 = 0;
    let mut len: usize = 0;
    // SAFETY: both out pointers are valid for writes of their size.
    let r = unsafe { libc::syscall(libc::SYS_get_robust_list, tid, &mut head as *mut u64, &mut len as *mut usize) };
    cvt(r)?;
    Ok((head, len as u64))
}

/// Sends `sig` to `pid`.
pub fn kill(pid: i32, sig: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::kill(pid, sig) };
    cvt(r as libc::c_long).map(drop)
}

/// Returns the calling process's umask without changing it.
pub fn current_umask() -> u32 {
    // SAFETY: umask cannot fail; the original value is put back at once.
    let old = unsafe { libc::umask(0o022) };
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    old
}

/// Whether `fd` of the calling process is a terminal.
pub fn isatty(fd: i32) -> bool {
    // SAFETY: isatty only inspects the descriptor number.
    unsafe { libc::isatty(fd) == 1 }
}

/// Sets the nice value of another process.
pub fn set_nice(pid: i32, nice: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::setpriority(libc::PRIO_PROCESS, pid as libc::id_t, nice) };
    cvt(r as libc::c_long).map(drop)
}

/// Whether descriptor `fd1` of `pid1` and `fd2` of `pid2` are the same open
/// file description (kcmp KCMP_FILE).
pub fn same_file(pid1: i32, fd1: i32, pid2: i32, fd2: i32) -> io::Result<bool> {
    const KCMP_FILE: libc::c_long = 0;
    // SAFETY: kcmp takes only integers for KCMP_FILE.
    let r = unsafe { libc::syscall(libc::SYS_kcmp, pid1, pid2, KCMP_FILE, fd1 as libc::c_long, fd2 as libc::c_long) };
    Ok(cvt(r)? == 0)
}

/// Creates a pipe with both ends close-on-exec: (read, write).
pub fn pipe() -> io::Result<(std::os::fd::OwnedFd, std::os::fd::OwnedFd)> {
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: `fds` has room for the two descriptors pipe2 writes.
    let r = unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) };
    cvt(r as libc::c_long)?;
    // SAFETY: pipe2 succeeded, so both are fresh descriptors we own.
    Ok(unsafe { (std::os::fd::OwnedFd::from_raw_fd(fds[0]), std::os::fd::OwnedFd::from_raw_fd(fds[1])) })
}

/// fcntl with an integer argument (F_GETPIPE_SZ, F_SETPIPE_SZ, F_GETFL, F_SETFL).
pub fn fcntl_int(fd: &impl std::os::fd::AsRawFd, cmd: i32, arg: i32) -> io::Result<i32> {
    // SAFETY: the commands used take an integer argument, no pointers.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), cmd, arg) };
    cvt(r as libc::c_long).map(|v| v as i32)
}

/// Duplicates up to `len` bytes from pipe `src` into pipe `dst` without
/// consuming them (tee(2), non-blocking).
pub fn tee(src: &impl std::os::fd::AsRawFd, dst: &impl std::os::fd::AsRawFd, len: usize) -> io::Result<usize> {
    // SAFETY: tee takes two descriptors and integers.
    let r = unsafe { libc::tee(src.as_raw_fd(), dst.as_raw_fd(), len, libc::SPLICE_F_NONBLOCK) };
    cvt(r as libc::c_long).map(|v| v as usize)
}

/// An unbound AF_UNIX datagram socket (close-on-exec).
pub fn unix_dgram_socket() -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::socket(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    cvt(r as libc::c_long)?;
    // SAFETY: socket succeeded, so `r` is a fresh descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) })
}

/// Builds a sockaddr_un for an abstract name (without the leading NUL).
/// Returns the address and its length.
pub fn abstract_addr(name: &[u8]) -> (libc::sockaddr_un, libc::socklen_t) {
    // SAFETY: sockaddr_un is plain old data; all-zero is valid.
    let mut addr: libc::sockaddr_un = unsafe { std::mem::zeroed() };
    addr.sun_family = libc::AF_UNIX as libc::sa_family_t;
    let n = name.len().min(addr.sun_path.len() - 1);
    for (i, b) in name[..n].iter().enumerate() {
        addr.sun_path[i + 1] = *b as libc::c_char;
    }
    let len = std::mem::size_of::<libc::sa_family_t>() + 1 + n;
    (addr, len as libc::socklen_t)
}

/// Sends descriptor `fd` with SCM_RIGHTS to the abstract unix address `name`.
pub fn send_fd(sock: &impl std::os::fd::AsRawFd, name: &[u8], fd: std::os::fd::RawFd) -> io::Result<()> {
    let (addr, alen) = abstract_addr(name);
    let mut byte = [0u8; 1];
    let mut iov = libc::iovec { iov_base: byte.as_mut_ptr().cast(), iov_len: 1 };
    // Room for one cmsghdr carrying one int, 8-byte aligned.
    let mut cbuf = [0u64; 4];
    // SAFETY: CMSG_SPACE is a pure size computation.
    let space = unsafe { libc::CMSG_SPACE(std::mem::size_of::<i32>() as u32) } as usize;
    // SAFETY: msghdr is plain old data; the fields are filled below.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&addr as *const libc::sockaddr_un).cast_mut().cast();
    msg.msg_namelen = alen;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = cbuf.as_mut_ptr().cast();
    msg.msg_controllen = space;
    // SAFETY: msg_control points at `cbuf`, large enough for CMSG_SPACE(4) (32 bytes >= 24).
    unsafe {
        let c = libc::CMSG_FIRSTHDR(&msg);
        (*c).cmsg_level = libc::SOL_SOCKET;
        (*c).cmsg_type = libc::SCM_RIGHTS;
        (*c).cmsg_len = libc::CMSG_LEN(std::mem::size_of::<i32>() as u32) as usize;
        std::ptr::write_unaligned(libc::CMSG_DATA(c).cast::<i32>(), fd);
    }
    // SAFETY: every pointer in `msg` refers to live locals for the duration of the call.
    let r = unsafe { libc::sendmsg(sock.as_raw_fd(), &msg, 0) };
    cvt(r as libc::c_long).map(drop)
}

/// open(2) with raw flags (O_CLOEXEC added).
pub fn open_raw(path: &str, flags: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    let c = std::ffi::CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let r = unsafe { libc::open(c.as_ptr(), flags | libc::O_CLOEXEC, 0) };
    cvt(r as libc::c_long)?;
    // SAFETY: open succeeded, so `r` is a fresh descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r) })
}

/// mkfifo(2) with permission bits `mode` (the umask still applies, so
/// they are set again with chmod).
pub fn mkfifo(path: &str, mode: u32) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let c = std::ffi::CString::new(path).map_err(|_| io::Error::from_raw_os_error(libc::EINVAL))?;
    // SAFETY: `c` is a valid NUL-terminated path for the duration of the call.
    let r = unsafe { libc::mkfifo(c.as_ptr(), mode as libc::mode_t) };
    cvt(r as libc::c_long)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
}

/// lseek(fd, pos, SEEK_SET).
pub fn seek_to(fd: &impl std::os::fd::AsRawFd, pos: i64) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), pos, libc::SEEK_SET) };
    cvt(r as libc::c_long).map(drop)
}

/// The bytes of a plain-old-data kernel struct (for copying it into a stub).
pub fn as_bytes(addr: &libc::sockaddr_un) -> &[u8] {
    // SAFETY: sockaddr_un is a repr(C) plain-old-data struct without padding
    // holes that matter here; reading its bytes is sound for its size.
    unsafe {
        std::slice::from_raw_parts(
            (addr as *const libc::sockaddr_un).cast::<u8>(),
            std::mem::size_of::<libc::sockaddr_un>(),
        )
    }
}

/// pidfd_open(2).
pub fn pidfd_open(pid: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid, 0) };
    cvt(r)?;
    // SAFETY: pidfd_open succeeded, so `r` is a fresh descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
}

/// pidfd_getfd(2): a duplicate of another process's descriptor.
pub fn pidfd_getfd(pidfd: &impl std::os::fd::AsRawFd, fd: i32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_getfd, pidfd.as_raw_fd(), fd, 0) };
    cvt(r)?;
    // SAFETY: pidfd_getfd succeeded, so `r` is a fresh descriptor we own.
    Ok(unsafe { std::os::fd::OwnedFd::from_raw_fd(r as i32) })
}

/// Kernel struct flock (x86_64).
#[repr(C)]
#[derive(Default)]
struct Flock {
    l_type: i16,
    l_whence: i16,
    l_start: i64,
    l_len: i64,
    l_pid: i32,
}
const _: () = assert!(std::mem::size_of::<Flock>() == 32);

/// Encodes a struct flock for F_SETLK (SEEK_SET based), for injection.
pub fn flock_struct(write: bool, start: u64, len: u64) -> Vec<u8> {
    let f = Flock {
        l_type: if write { libc::F_WRLCK as i16 } else { libc::F_RDLCK as i16 },
        l_whence: libc::SEEK_SET as i16,
        l_start: start as i64,
        l_len: len as i64,
        l_pid: 0,
    };
    let mut v = Vec::with_capacity(32);
    v.extend_from_slice(&f.l_type.to_le_bytes());
    v.extend_from_slice(&f.l_whence.to_le_bytes());
    v.extend_from_slice(&[0u8; 4]);
    v.extend_from_slice(&f.l_start.to_le_bytes());
    v.extend_from_slice(&f.l_len.to_le_bytes());
    v.extend_from_slice(&f.l_pid.to_le_bytes());
    v.extend_from_slice(&[0u8; 4]);
    v
}

/// Creates the init of a new pid namespace (pid 1 inside) which in turn
/// creates the restore stub with pid `root` inside the namespace, then reaps
/// children until none is left and exits with the stub's exit code.
/// Returns the init's pid in floe's namespace.
///
/// Both children run only raw syscalls, so this is safe to call from a
/// multi-threaded process.
pub fn spawn_ns_init(root: i32) -> io::Result<i32> {
    let args = CloneArgs { flags: libc::CLONE_NEWPID as u64, exit_signal: libc::SIGCHLD as u64, ..Default::default() };
    let tid: [i32; 1] = [root];
    let root_args = CloneArgs {
        exit_signal: libc::SIGCHLD as u64,
        set_tid: tid.as_ptr() as u64,
        set_tid_size: 1,
        ..Default::default()
    };
    // SAFETY: as in spawn_stub: no CLONE_VM, so the child has its own copy
    // of the argument structs; the child branch uses raw syscalls only and
    // never returns.
    let r = unsafe { libc::syscall(libc::SYS_clone3, &args as *const CloneArgs, std::mem::size_of::<CloneArgs>()) };
    if r == 0 {
        // SAFETY: child (pid 1 of the new namespace): raw syscalls only, never returns.
        unsafe {
            libc::syscall(libc::SYS_close_range, 0u32, u32::MAX, 0u32);
            let stub =
                libc::syscall(libc::SYS_clone3, &root_args as *const CloneArgs, std::mem::size_of::<CloneArgs>());
            if stub == 0 {
                libc::syscall(libc::SYS_prctl, libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                loop {
                    libc::syscall(libc::SYS_pause);
                }
            }
            if stub < 0 {
                libc::syscall(libc::SYS_exit_group, 127);
            }
            let mut code: libc::c_long = 0;
            loop {
                let mut status: libc::c_int = 0;
                let w = libc::syscall(libc::SYS_wait4, -1, &mut status as *mut libc::c_int, libc::__WALL, 0usize);
                if w < 0 {
                    if *libc::__errno_location() == libc::EINTR {
                        continue;
                    }
                    libc::syscall(libc::SYS_exit_group, code);
                }
                if w == stub {
                    code = if libc::WIFEXITED(status) {
                        libc::WEXITSTATUS(status) as libc::c_long
                    } else {
                        128 + libc::WTERMSIG(status) as libc::c_long
                    };
                }
            }
        }
    }
    cvt(r).map(|p| p as i32)
}

/// shmget(2).
pub fn shmget(key: i32, size: u64, flags: i32) -> io::Result<i32> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::shmget(key, size as usize, flags) };
    cvt(r as libc::c_long).map(|v| v as i32)
}

/// shmctl(IPC_SET): owner and permission bits of a segment.
pub fn shm_set_owner(id: i32, uid: u32, gid: u32, mode: u32) -> io::Result<()> {
    // SAFETY: shmid_ds is plain old data; all-zero is valid.
    let mut ds: libc::shmid_ds = unsafe { std::mem::zeroed() };
    // SAFETY: IPC_STAT fills `ds`, which outlives the call.
    let r = unsafe { libc::shmctl(id, libc::IPC_STAT, &mut ds) };
    cvt(r as libc::c_long)?;
    ds.shm_perm.uid = uid;
    ds.shm_perm.gid = gid;
    ds.shm_perm.mode = (mode & 0o777) as _;
    // SAFETY: IPC_SET reads `ds`.
    let r = unsafe { libc::shmctl(id, libc::IPC_SET, &mut ds) };
    cvt(r as libc::c_long).map(drop)
}

/// shmctl(IPC_RMID).
pub fn shm_remove(id: i32) -> io::Result<()> {
    // SAFETY: IPC_RMID takes no buffer.
    let r = unsafe { libc::shmctl(id, libc::IPC_RMID, std::ptr::null_mut()) };
    cvt(r as libc::c_long).map(drop)
}

pub const F_SETSIG: i32 = 10;
pub const F_GETSIG: i32 = 11;
const F_SETOWN_EX: i32 = 15;
const F_GETOWN_EX: i32 = 16;
/// F_OWNER_PID of struct f_owner_ex.
pub const F_OWNER_PID: i32 = 1;

/// F_GETOWN_EX: (owner type, pid) of an open file description.
pub fn get_owner(fd: &impl std::os::fd::AsRawFd) -> io::Result<(i32, i32)> {
    let mut o = [0i32; 2];
    // SAFETY: struct f_owner_ex is two ints; `o` outlives the call.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), F_GETOWN_EX, o.as_mut_ptr()) };
    cvt(r as libc::c_long)?;
    Ok((o[0], o[1]))
}

/// F_SETOWN_EX.
pub fn set_owner(fd: &impl std::os::fd::AsRawFd, kind: i32, pid: i32) -> io::Result<()> {
    let o = [kind, pid];
    // SAFETY: struct f_owner_ex is two ints; the kernel only reads `o`.
    let r = unsafe { libc::fcntl(fd.as_raw_fd(), F_SETOWN_EX, o.as_ptr()) };
    cvt(r as libc::c_long).map(drop)
}

/// Deallocates [offset, offset+len) of a file, keeping its size (reads give zeros).
pub fn punch_hole(fd: &impl std::os::fd::AsRawFd, offset: u64, len: u64) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe {
        libc::fallocate(
            fd.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as i64,
            len as i64,
        )
    };
    cvt(r as libc::c_long).map(drop)
}

/// A set of CPUs (the kernel's cpumask as sched_setaffinity takes it).
#[derive(Clone, Copy)]
pub struct CpuSet(libc::cpu_set_t);

impl CpuSet {
    /// Only CPU `cpu`.
    pub fn one(cpu: usize) -> Self {
        // SAFETY: cpu_set_t is a plain bit array; all zeros is the empty set.
        let mut s: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        // SAFETY: CPU_SET only writes the bit for `cpu` inside `s`, and ignores
        // numbers beyond the set's size.
        unsafe { libc::CPU_SET(cpu, &mut s) };
        CpuSet(s)
    }
}

impl CpuSet {
    /// The CPUs in the set, ascending.
    pub fn cpus(&self) -> Vec<usize> {
        // SAFETY: CPU_ISSET only reads the bit for `c` inside the set.
        (0..libc::CPU_SETSIZE as usize).filter(|&c| unsafe { libc::CPU_ISSET(c, &self.0) }).collect()
    }

    /// The set of `cpus` (numbers beyond the set's size are left out).
    pub fn of(cpus: &[usize]) -> Self {
        // SAFETY: all zeros is the empty set.
        let mut s: libc::cpu_set_t = unsafe { std::mem::zeroed() };
        for &c in cpus {
            // SAFETY: CPU_SET ignores numbers beyond the set's size.
            unsafe { libc::CPU_SET(c, &mut s) };
        }
        CpuSet(s)
    }
}

/// `SCHED_RESET_ON_FORK`, or-ed into the policy.
pub const SCHED_RESET_ON_FORK: i32 = 0x4000_0000;
/// `SCHED_DEADLINE` (its parameters need sched_getattr; not supported).
pub const SCHED_DEADLINE: i32 = 6;

/// Scheduling policy (with [`SCHED_RESET_ON_FORK`]) and real-time priority of task `tid`.
pub fn get_scheduler(tid: i32) -> io::Result<(i32, i32)> {
    // SAFETY: plain syscall with an integer argument.
    let policy = unsafe { libc::sched_getscheduler(tid) };
    cvt(policy.into())?;
    let mut param = libc::sched_param { sched_priority: 0 };
    // SAFETY: the kernel writes one struct sched_param into `param`.
    let r = unsafe { libc::sched_getparam(tid, &mut param) };
    cvt(r.into())?;
    Ok((policy, param.sched_priority))
}

/// Sets task `tid`'s scheduling policy (may include [`SCHED_RESET_ON_FORK`]) and priority.
pub fn set_scheduler(tid: i32, policy: i32, priority: i32) -> io::Result<()> {
    let param = libc::sched_param { sched_priority: priority };
    // SAFETY: the kernel reads one struct sched_param from `param`.
    let r = unsafe { libc::sched_setscheduler(tid, policy, &param) };
    cvt(r.into()).map(drop)
}

const IOPRIO_WHO_PROCESS: libc::c_long = 1;

/// I/O priority of task `tid` (class << 13 | level; 0: none set).
pub fn get_ioprio(tid: i32) -> io::Result<i32> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe { libc::syscall(libc::SYS_ioprio_get, IOPRIO_WHO_PROCESS, libc::c_long::from(tid)) };
    cvt(r).map(|v| v as i32)
}

/// Sets task `tid`'s I/O priority.
pub fn set_ioprio(tid: i32, prio: i32) -> io::Result<()> {
    // SAFETY: plain syscall with integer arguments.
    let r = unsafe {
        libc::syscall(libc::SYS_ioprio_set, IOPRIO_WHO_PROCESS, libc::c_long::from(tid), libc::c_long::from(prio))
    };
    cvt(r).map(drop)
}

/// The CPUs task `tid` may run on.
pub fn get_affinity(tid: i32) -> io::Result<CpuSet> {
    // SAFETY: all zeros is a valid cpu_set_t.
    let mut s: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: the kernel writes at most size_of::<cpu_set_t>() bytes into `s`.
    let r = unsafe { libc::sched_getaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &mut s) };
    cvt(r.into())?;
    Ok(CpuSet(s))
}

/// Lets task `tid` run only on `set`.
pub fn set_affinity(tid: i32, set: &CpuSet) -> io::Result<()> {
    // SAFETY: the kernel reads size_of::<cpu_set_t>() bytes from `set`.
    let r = unsafe { libc::sched_setaffinity(tid, std::mem::size_of::<libc::cpu_set_t>(), &set.0) };
    cvt(r.into()).map(drop)
}

/// The CPU the calling thread runs on now.
pub fn current_cpu() -> Option<usize> {
    // SAFETY: sched_getcpu takes no arguments.
    let r = unsafe { libc::sched_getcpu() };
    usize::try_from(r).ok()
}
