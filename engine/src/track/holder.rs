//! Keeps a [`UffdTracker`] alive between floe invocations (`floe pre-dump`,
//! then a later `floe dump --prev-images-dir`).
//!
//! [`hold`] forks (double fork, setsid) a small holder process named
//! `floe-track` that owns a copy of the uffd and serves it on the abstract
//! unix socket `floe-track-<pid>` (SOCK_SEQPACKET, in floe's network
//! namespace). Protocol, one request per connection:
//!
//! * `get` → the payload below in messages of up to 64 KiB, the uffd
//!   attached (SCM_RIGHTS) to the first. Payload: magic `FLTK`, version u32
//!   (1), holder pid u32, reserved u32, range count u64, then `count` pairs of
//!   u64 (start, end); all little endian.
//! * `stop` → the holder unbinds its name, closes the connection and exits.
//!
//! The holder serves only peers with floe's uid (or root): the uffd could be
//! used to register other modes on the tracked process. It exits by itself
//! when the tracked process exits (it polls a pidfd), after 24 h without a
//! request, or on `stop`. When it (and every fetched copy) is gone, the uffd
//! closes and the kernel drops the registration: nothing stays in the
//! tracked process. The ranges it serves are those of the tracker given to
//! [`hold`]; after [`UffdTracker::register`] on a fetched tracker, `hold` it
//! again to replace the holder.
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::time::{Duration, Instant};

use super::{TrackError, UffdTracker};
use crate::sys::task::pidfd_open;
use crate::sys::track as sys;

const MAGIC: &[u8; 4] = b"FLTK";
const VERSION: u32 = 1;
const HEADER: usize = 24;
const PID_OFFSET: usize = 8;
/// How long a requester waits for the holder.
const IO_TIMEOUT: Duration = Duration::from_secs(5);

/// The abstract socket name of the holder of `pid`.
pub fn socket_name(pid: i32) -> String {
    format!("floe-track-{pid}")
}

fn holder_err(pid: i32, detail: impl Into<String>) -> TrackError {
    TrackError::Holder { pid, detail: detail.into() }
}

fn is_absent(e: &std::io::Error) -> bool {
    matches!(e.raw_os_error(), Some(libc::ECONNREFUSED | libc::ENOENT))
}

/// Connects to the holder of `pid`; None when there is none.
fn connect(pid: i32) -> Result<Option<OwnedFd>, TrackError> {
    let sock = match sys::seqpacket_connect(socket_name(pid).as_bytes()) {
        Ok(s) => s,
        Err(e) if is_absent(&e) => return Ok(None),
        Err(source) => return Err(TrackError::Sys { pid, op: "connecting to the tracker holder", source }),
    };
    let (_, uid) = sys::peer_cred(sock.as_fd()).map_err(|source| TrackError::Sys { pid, op: "SO_PEERCRED", source })?;
    let me = sys::geteuid();
    if uid != 0 && uid != me {
        return Err(holder_err(pid, format!("socket is owned by uid {uid}, not by floe's uid {me} or root")));
    }
    sys::set_recv_timeout(sock.as_fd(), IO_TIMEOUT).map_err(|source| TrackError::Sys {
        pid,
        op: "SO_RCVTIMEO",
        source,
    })?;
    Ok(Some(sock))
}

/// Whether a holder answers for `pid`.
pub fn running(pid: i32) -> bool {
    matches!(connect(pid), Ok(Some(_)))
}

/// Hands `tracker` to a new holder process for `pid` (replacing a holder
/// already serving `pid`). Returns once the holder is listening.
pub fn hold(pid: i32, tracker: UffdTracker) -> Result<(), TrackError> {
    let name = socket_name(pid);
    let pidfd = pidfd_open(pid).map_err(|source| TrackError::Sys { pid, op: "pidfd_open", source })?;
    let payload = encode(tracker.ranges());
    let spec = sys::HolderSpec {
        name: name.as_bytes(),
        pidfd: pidfd.as_fd(),
        uffd: tracker.fd(),
        payload: &payload,
        pid_offset: PID_OFFSET,
        allowed_uid: sys::geteuid(),
    };
    let deadline = Instant::now() + IO_TIMEOUT;
    loop {
        match sys::spawn_holder(&spec) {
            Ok(()) => break,
            Err(e) if e.raw_os_error() == Some(libc::EADDRINUSE) && Instant::now() < deadline => {
                // An older holder for this pid: replace it.
                stop(pid)?;
                std::thread::sleep(Duration::from_millis(5));
            }
            Err(source) => return Err(TrackError::Sys { pid, op: "starting the tracker holder", source }),
        }
    }
    tracing::debug!(pid, ranges = tracker.ranges().len(), "uffd tracker handed to a holder");
    Ok(())
}

/// Takes a copy of the tracker held for `pid`; None if no holder serves
/// `pid`. The holder keeps running (and keeps its copy): [`stop`] it when
/// done, or [`hold`] the tracker again.
pub fn fetch(pid: i32) -> Result<Option<UffdTracker>, TrackError> {
    Ok(fetch_with_pid(pid)?.map(|(t, _)| t))
}

/// [`fetch`], also returning the holder's pid.
pub(crate) fn fetch_with_pid(pid: i32) -> Result<Option<(UffdTracker, i32)>, TrackError> {
    let Some(sock) = connect(pid)? else { return Ok(None) };
    sys::send_msg(sock.as_fd(), b"get").map_err(|source| TrackError::Sys { pid, op: "sending get", source })?;
    let mut buf = vec![0u8; sys::HOLDER_CHUNK];
    let recv = |buf: &mut [u8]| {
        sys::recv_msg(sock.as_fd(), buf).map_err(|source| TrackError::Sys {
            pid,
            op: "receiving from the tracker holder",
            source,
        })
    };
    let first = recv(&mut buf)?;
    if first.len == 0 {
        return Err(holder_err(pid, "hung up without answering"));
    }
    if first.truncated {
        return Err(holder_err(pid, "reply truncated"));
    }
    let mut fds = first.fds.into_iter();
    let fd = fds.next().ok_or_else(|| holder_err(pid, "reply carried no descriptor"))?;
    let (holder_pid, count) = decode_header(&buf[..first.len]).ok_or_else(|| holder_err(pid, "bad reply header"))?;
    let total = usize::try_from(count)
        .ok()
        .and_then(|c| c.checked_mul(16))
        .and_then(|b| b.checked_add(HEADER))
        .filter(|t| *t <= 16 * 1024 * 1024)
        .ok_or_else(|| holder_err(pid, format!("implausible range count {count}")))?;
    let mut payload = buf[..first.len].to_vec();
    while payload.len() < total {
        let more = recv(&mut buf)?;
        if more.len == 0 || more.truncated {
            return Err(holder_err(pid, "reply cut short"));
        }
        payload.extend_from_slice(&buf[..more.len]);
    }
    if payload.len() != total {
        return Err(holder_err(pid, "reply longer than announced"));
    }
    let link = std::fs::read_link(format!("/proc/self/fd/{}", fd.as_raw_fd())).unwrap_or_default();
    if link.as_os_str() != "anon_inode:[userfaultfd]" {
        return Err(holder_err(pid, format!("descriptor received is {}, not a userfaultfd", link.display())));
    }
    let ranges = payload[HEADER..].chunks_exact(16).map(|c| (le64(&c[..8]), le64(&c[8..]))).collect();
    Ok(Some((UffdTracker::from_fd(fd, ranges), holder_pid)))
}

/// Asks the holder of `pid` to exit and waits until it hung up (no-op when
/// there is none). Copies already fetched stay valid.
pub fn stop(pid: i32) -> Result<(), TrackError> {
    let Some(sock) = connect(pid)? else { return Ok(()) };
    sys::send_msg(sock.as_fd(), b"stop").map_err(|source| TrackError::Sys { pid, op: "sending stop", source })?;
    let mut buf = [0u8; 16];
    match sys::recv_msg(sock.as_fd(), &mut buf) {
        Ok(r) if r.len == 0 => Ok(()),
        Ok(_) => Err(holder_err(pid, "answered stop instead of exiting")),
        Err(e) if e.raw_os_error() == Some(libc::ECONNRESET) => Ok(()),
        Err(source) => Err(TrackError::Sys { pid, op: "waiting for the tracker holder to exit", source }),
    }
}

fn le64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(b);
    u64::from_le_bytes(a)
}

fn encode(ranges: &[(u64, u64)]) -> Vec<u8> {
    let mut v = Vec::with_capacity(HEADER + ranges.len() * 16);
    v.extend_from_slice(MAGIC);
    v.extend_from_slice(&VERSION.to_le_bytes());
    v.extend_from_slice(&0u32.to_le_bytes()); // holder pid, filled in by the holder
    v.extend_from_slice(&0u32.to_le_bytes());
    v.extend_from_slice(&(ranges.len() as u64).to_le_bytes());
    for &(s, e) in ranges {
        v.extend_from_slice(&s.to_le_bytes());
        v.extend_from_slice(&e.to_le_bytes());
    }
    v
}

/// (holder pid, range count) from a reply's first message.
fn decode_header(b: &[u8]) -> Option<(i32, u64)> {
    if b.len() < HEADER || &b[..4] != MAGIC {
        return None;
    }
    let version = u32::from_le_bytes(b[4..8].try_into().ok()?);
    if version != VERSION {
        return None;
    }
    let pid = u32::from_le_bytes(b[8..12].try_into().ok()?) as i32;
    Some((pid, le64(&b[16..24])))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn track_holder_payload_round_trip() {
        let ranges = [(0x1000u64, 0x3000u64), (0x7f00_0000_0000, 0x7f00_0400_0000)];
        let mut p = encode(&ranges);
        p[PID_OFFSET..PID_OFFSET + 4].copy_from_slice(&4242u32.to_le_bytes());
        assert_eq!(decode_header(&p), Some((4242, 2)));
        assert_eq!(p.len(), HEADER + 32);
        assert_eq!(le64(&p[HEADER + 16..HEADER + 24]), 0x7f00_0000_0000);
        assert_eq!(decode_header(b"nope"), None);
    }
}
