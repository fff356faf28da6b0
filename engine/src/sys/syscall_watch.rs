//! Counting some syscalls of some processes, without stopping them: a small
//! eBPF program on the `sys_enter` raw tracepoint adds one to a per-process
//! counter whenever a watched process (by thread-group id) enters one of the
//! watched syscalls.
//!
//! Live migration uses it to know whether a process may have changed the
//! VmFlags of a mapping (madvise, mlock, ...) since its last pre-copy pass:
//! if not, the final freeze takes the flags that pass read from smaps and
//! reads only /proc/PID/maps, sparing the page-table walk of smaps (~15 ms
//! per GiB) inside the downtime.
//!
//! The program is written here as raw instructions (no compiler, no
//! libbpf): look up the caller's tgid in a hash map; if present and the
//! syscall number (`ctx->args[1]` of `sys_enter`) is one of the watched
//! ones, add one to its value atomically. It uses only helpers available to
//! programs of any license.
use std::io;
use std::mem::size_of;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

const BPF_MAP_CREATE: libc::c_long = 0;
const BPF_MAP_LOOKUP_ELEM: libc::c_long = 1;
const BPF_MAP_UPDATE_ELEM: libc::c_long = 2;
const BPF_MAP_DELETE_ELEM: libc::c_long = 3;
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: libc::c_long = 17;
const BPF_MAP_TYPE_HASH: u32 = 1;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_PSEUDO_MAP_FD: u8 = 1;
const BPF_ANY: u64 = 0;
const FUNC_MAP_LOOKUP_ELEM: i32 = 1;
const FUNC_GET_CURRENT_PID_TGID: i32 = 14;

/// `union bpf_attr`, as far as the commands used here go (the kernel
/// requires what it does not know to be zero).
#[repr(C, align(8))]
struct Attr([u8; 128]);

const _: () = assert!(size_of::<Attr>() == 128);

impl Attr {
    fn new() -> Self {
        Attr([0; 128])
    }
    fn u32_at(mut self, at: usize, v: u32) -> Self {
        self.0[at..at + 4].copy_from_slice(&v.to_ne_bytes());
        self
    }
    fn u64_at(mut self, at: usize, v: u64) -> Self {
        self.0[at..at + 8].copy_from_slice(&v.to_ne_bytes());
        self
    }
}

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: attr is a live, 8-byte-aligned buffer of the size passed;
    // every pointer stored in it (by the callers) points at memory that
    // outlives this call.
    let ret = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr as *mut Attr, size_of::<Attr>() as libc::c_uint) };
    super::cvt(ret)
}

fn bpf_fd(cmd: libc::c_long, attr: &mut Attr) -> io::Result<OwnedFd> {
    let fd = bpf(cmd, attr)?;
    // SAFETY: these commands return a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// One eBPF instruction: opcode, registers, offset, immediate.
fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
    let mut b = [0u8; 8];
    b[0] = code;
    b[1] = (dst & 0x0f) | (src << 4);
    b[2..4].copy_from_slice(&off.to_le_bytes());
    b[4..8].copy_from_slice(&imm.to_le_bytes());
    b
}

const MOV64_REG: u8 = 0xbf;
const MOV64_IMM: u8 = 0xb7;
const ADD64_IMM: u8 = 0x07;
const RSH64_IMM: u8 = 0x77;
const STX_W: u8 = 0x63;
const LDX_DW: u8 = 0x79;
const LD_IMM64: u8 = 0x18;
const JEQ_IMM: u8 = 0x15;
const JA: u8 = 0x05;
const CALL: u8 = 0x85;
const EXIT: u8 = 0x95;
/// BPF_STX | BPF_ATOMIC | BPF_DW with imm BPF_ADD: `lock *(u64 *)(dst + off) += src`.
const ATOMIC_DW: u8 = 0xdb;

/// The program: see the module documentation.
fn program(map_fd: i32, nrs: &[u32]) -> Vec<u8> {
    let n = nrs.len();
    let hit = 12 + n;
    let exit = hit + 2;
    let mut p: Vec<[u8; 8]> = vec![
        insn(MOV64_REG, 6, 1, 0, 0),                     // r6 = ctx
        insn(CALL, 0, 0, 0, FUNC_GET_CURRENT_PID_TGID),  // r0 = tgid << 32 | pid
        insn(RSH64_IMM, 0, 0, 0, 32),                    // r0 = tgid
        insn(STX_W, 10, 0, -4, 0),                       // key on the stack
        insn(LD_IMM64, 1, BPF_PSEUDO_MAP_FD, 0, map_fd), // r1 = map
        insn(0, 0, 0, 0, 0),                             //   (second half)
        insn(MOV64_REG, 2, 10, 0, 0),                    // r2 = &key
        insn(ADD64_IMM, 2, 0, 0, -4),                    //
        insn(CALL, 0, 0, 0, FUNC_MAP_LOOKUP_ELEM),       // r0 = &counter or NULL
        insn(JEQ_IMM, 0, 0, (exit - 10) as i16, 0),      // not watched
        insn(LDX_DW, 1, 6, 8, 0),                        // r1 = syscall number
    ];
    for (k, &nr) in nrs.iter().enumerate() {
        p.push(insn(JEQ_IMM, 1, 0, (hit - (12 + k)) as i16, nr as i32));
    }
    p.push(insn(JA, 0, 0, 2, 0)); // none of them
    p.push(insn(MOV64_IMM, 1, 0, 0, 1)); // hit: r1 = 1
    p.push(insn(ATOMIC_DW, 0, 1, 0, 0)); //      *counter += 1
    p.push(insn(MOV64_IMM, 0, 0, 0, 0)); // exit: return 0
    p.push(insn(EXIT, 0, 0, 0, 0));
    debug_assert_eq!(p.len(), exit + 2);
    p.concat()
}

/// A syscall number no kernel has: the watch counts it too, so that
/// [`SyscallWatch::start`] can check that it sees this process under the
/// pid it knows (the program sees pids of the initial pid namespace).
const PROBE_NR: u32 = 1000;

/// A running watch; dropping it detaches the program.
#[derive(Debug)]
pub struct SyscallWatch {
    map: OwnedFd,
    _prog: OwnedFd,
    _link: OwnedFd,
}

impl SyscallWatch {
    /// Starts counting, per process in `tgids`, entries into the syscalls
    /// `nrs`. Needs CAP_BPF and CAP_PERFMON (or root) and a kernel with
    /// BPF raw tracepoints.
    pub fn start(tgids: &[i32], nrs: &[u32]) -> io::Result<Self> {
        let me = std::process::id() as i32;
        let entries = tgids.len() as u32 + 1;
        let mut a = Attr::new().u32_at(0, BPF_MAP_TYPE_HASH).u32_at(4, 4).u32_at(8, 8).u32_at(12, entries);
        let map = bpf_fd(BPF_MAP_CREATE, &mut a)?;
        for &t in tgids.iter().chain([&me]) {
            Self::set(&map, t, 0)?;
        }
        let mut watched = nrs.to_vec();
        watched.push(PROBE_NR);
        let code = program(map.as_raw_fd(), &watched);
        let license = c"Apache-2.0";
        let mut a = Attr::new()
            .u32_at(0, BPF_PROG_TYPE_RAW_TRACEPOINT)
            .u32_at(4, (code.len() / 8) as u32)
            .u64_at(8, code.as_ptr() as u64)
            .u64_at(16, license.as_ptr() as u64);
        let prog = bpf_fd(BPF_PROG_LOAD, &mut a)?;
        let tp = c"sys_enter";
        let mut a = Attr::new().u64_at(0, tp.as_ptr() as u64).u32_at(8, prog.as_raw_fd() as u32);
        let link = bpf_fd(BPF_RAW_TRACEPOINT_OPEN, &mut a)?;
        let w = SyscallWatch { map, _prog: prog, _link: link };
        // The program must see this process under the pid it knows.
        // SAFETY: an unknown syscall number only returns ENOSYS.
        unsafe { libc::syscall(PROBE_NR as libc::c_long) };
        let seen = w.count(me)?;
        if tgids.contains(&me) {
            w.reset(me)?;
        } else {
            let key = me as u32;
            let mut a = Attr::new().u32_at(0, w.map.as_raw_fd() as u32).u64_at(8, &key as *const u32 as u64);
            bpf(BPF_MAP_DELETE_ELEM, &mut a)?;
        }
        if seen == 0 {
            return Err(io::Error::other(
                "the eBPF program does not see this process under its pid (floe runs in a pid namespace of its own?)",
            ));
        }
        Ok(w)
    }

    fn set(map: &OwnedFd, tgid: i32, v: u64) -> io::Result<()> {
        let key = tgid as u32;
        let mut a = Attr::new()
            .u32_at(0, map.as_raw_fd() as u32)
            .u64_at(8, &key as *const u32 as u64)
            .u64_at(16, &v as *const u64 as u64)
            .u64_at(24, BPF_ANY);
        bpf(BPF_MAP_UPDATE_ELEM, &mut a).map(|_| ())
    }

    /// Watched syscalls `tgid` entered since it was last reset.
    pub fn count(&self, tgid: i32) -> io::Result<u64> {
        let key = tgid as u32;
        let mut v = 0u64;
        let mut a = Attr::new()
            .u32_at(0, self.map.as_raw_fd() as u32)
            .u64_at(8, &key as *const u32 as u64)
            .u64_at(16, &mut v as *mut u64 as u64);
        bpf(BPF_MAP_LOOKUP_ELEM, &mut a)?;
        Ok(v)
    }

    /// Sets `tgid`'s count back to zero.
    pub fn reset(&self, tgid: i32) -> io::Result<()> {
        Self::set(&self.map, tgid, 0)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn program_layout() {
        let p = program(7, &[28, 149]);
        assert_eq!(p.len() % 8, 0);
        let insns: Vec<&[u8]> = p.chunks(8).collect();
        assert_eq!(insns.len(), 18);
        // The probe number is added by start(), not by program().
        // The map load names the map by descriptor.
        assert_eq!((insns[4][0], insns[4][1] >> 4, insns[4][4]), (LD_IMM64, BPF_PSEUDO_MAP_FD, 7));
        // Both syscall tests jump to the same place, the increment.
        let target = |i: usize| i as i64 + 1 + i16::from_le_bytes([insns[i][2], insns[i][3]]) as i64;
        assert_eq!(target(11), 14);
        assert_eq!(target(12), 14);
        assert_eq!((insns[14][0], insns[15][0]), (MOV64_IMM, ATOMIC_DW));
        // The null check and the fall-through go to the exit.
        assert_eq!(target(9), 16);
        assert_eq!(target(13), 16);
        assert_eq!(insns[17][0], EXIT);
    }

    #[test]
    fn counts_the_watched_syscalls_of_watched_processes() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("skipped: loading eBPF needs root");
            return;
        }
        // The watched process is a child: any watch this test process starts
        // (other tests, floe check's probe) makes a probe syscall of its own,
        // which a watch of this very process would count.
        const NR: u32 = 1001; // a number no syscall has: ENOSYS, after sys_enter
        let mut go = [0i32; 2];
        // SAFETY: pipe writes two descriptors into `go`.
        assert_eq!(unsafe { libc::pipe(go.as_mut_ptr()) }, 0);
        // SAFETY: the child only makes raw syscalls (read, the unknown
        // syscall, _exit): nothing that a lock held by another thread of this
        // process at the fork could block.
        let child = unsafe { libc::fork() };
        if child == 0 {
            let mut b = 0u8;
            // SAFETY: reads one byte into `b`; then plain syscalls and _exit.
            unsafe {
                libc::read(go[0], (&mut b as *mut u8).cast(), 1);
                libc::syscall(libc::c_long::from(NR));
                libc::_exit(0);
            }
        }
        assert!(child > 0, "fork failed");
        let w = match SyscallWatch::start(&[child], &[NR]) {
            Ok(w) => w,
            Err(e) => panic!("cannot start the syscall watch: {e}"),
        };
        assert_eq!(w.count(child).unwrap(), 0);
        // SAFETY: writes one byte from a live buffer; waitpid on our own child.
        unsafe {
            libc::write(go[1], [1u8].as_ptr().cast(), 1);
            libc::waitpid(child, std::ptr::null_mut(), 0);
            libc::close(go[0]);
            libc::close(go[1]);
        }
        // Its read and exit (unwatched) did not count, the unknown syscall did.
        assert_eq!(w.count(child).unwrap(), 1);
        w.reset(child).unwrap();
        assert_eq!(w.count(child).unwrap(), 0);
        // Another process is not watched.
        assert!(w.count(1).is_err());
    }
}
