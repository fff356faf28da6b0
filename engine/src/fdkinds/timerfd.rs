//! timerfd descriptors: clock, pending expirations ("ticks"), settime flags,
//! time left and period, read from fdinfo:
//!
//! ```text
//! clockid: 1
//! ticks: 0
//! settime flags: 01
//! it_value: (1, 999771393)
//! it_interval: (0, 100000000)
//! ```
//!
//! Dump. A periodic timer that expired and was not read yet shows
//! `it_value: (0, 0)` and `ticks: 1` however many periods passed: the kernel
//! only counts the missed periods (and re-arms the timer) when the owner
//! reads it or calls timerfd_gettime. That state is recognisable (a disarmed
//! timer always has ticks 0, since timerfd_settime clears them), and floe
//! then takes a copy of the descriptor (pidfd_getfd) and calls
//! timerfd_gettime on it, which settles the count exactly as the owner's
//! next call would, before reading fdinfo again. Should that fail, the timer
//! is saved as due one period later and the missed periods beyond the first
//! are lost.
//!
//! Restore. `timerfd_create(clockid, flags)`, then `timerfd_settime` with the
//! time left at the dump and the period, then TFD_IOC_SET_TICKS with the
//! pending expirations (settime clears them, so it comes last). The time
//! between dump and restore does not count: a timer with 2 s left at the
//! dump fires 2 s after the restore creates it (like a stopped process that
//! resumes). Absolute timers (TFD_TIMER_ABSTIME) get the same treatment on
//! purpose: they are re-armed for "now + time left", expressed as an
//! absolute time on the same clock so the settime flags (and with them
//! TFD_TIMER_CANCEL_ON_SET) are kept. An absolute deadline on
//! CLOCK_MONOTONIC/CLOCK_BOOTTIME would be meaningless on another boot or
//! machine; for CLOCK_REALTIME this means a wall-clock deadline moves by the
//! time the process spent checkpointed.
use super::eventfd::fdinfo_value;
use super::{DumpCtx, RestoreCtx};
use crate::sys::fd_event;
use floe_proto::image as pb;
use std::os::fd::{AsRawFd, OwnedFd};

/// Flags timerfd_settime accepts.
const SETTIME_FLAGS: u32 = (libc::TFD_TIMER_ABSTIME | libc::TFD_TIMER_CANCEL_ON_SET) as u32;

/// What fdinfo says about a timerfd.
#[derive(Debug, Clone, PartialEq)]
struct State {
    clockid: i32,
    ticks: u64,
    settime_flags: u32,
    value_ns: u64,
    interval_ns: u64,
}

impl State {
    /// A periodic timer whose last expiration was not read yet: its fdinfo
    /// shows no time left and one tick, whatever the real count is.
    fn unsettled(&self) -> bool {
        self.value_ns == 0 && self.interval_ns > 0 && self.ticks > 0
    }
}

/// "(sec, nsec)" in ns.
fn parse_time(s: &str) -> Option<u64> {
    let (sec, nsec) = s.strip_prefix('(')?.strip_suffix(')')?.split_once(',')?;
    let sec: u64 = sec.trim().parse().ok()?;
    let nsec: u64 = nsec.trim().parse().ok()?;
    sec.checked_mul(1_000_000_000)?.checked_add(nsec)
}

fn parse(fdinfo: &str) -> Result<State, String> {
    let field = |key: &str| fdinfo_value(fdinfo, key).ok_or_else(|| format!("its fdinfo has no {key:?} line"));
    let bad = |key: &str, v: &str| format!("cannot parse {key:?} {v:?} from its fdinfo");
    let v = field("clockid:")?;
    let clockid = v.parse().map_err(|_| bad("clockid:", v))?;
    let v = field("ticks:")?;
    let ticks = v.parse().map_err(|_| bad("ticks:", v))?;
    let v = field("settime flags:")?;
    let settime_flags = u32::from_str_radix(v, 8).map_err(|_| bad("settime flags:", v))?;
    let v = field("it_value:")?;
    let value_ns = parse_time(v).ok_or_else(|| bad("it_value:", v))?;
    let v = field("it_interval:")?;
    let interval_ns = parse_time(v).ok_or_else(|| bad("it_interval:", v))?;
    Ok(State { clockid, ticks, settime_flags, value_ns, interval_ns })
}

/// Lets the kernel count the missed periods of an expired periodic timer
/// (timerfd_gettime on a copy of the descriptor), then reads fdinfo again.
/// Retried when the timer expires once more in between (periods of
/// microseconds); returns the last reading either way.
fn settle(pid: i32, fd: i32) -> Result<State, String> {
    let copy = fd_event::fd_of_process(pid, fd).map_err(|e| format!("pidfd_getfd: {e}"))?;
    let path = format!("/proc/self/fdinfo/{}", copy.as_raw_fd());
    let mut last = None;
    for _ in 0..3 {
        fd_event::timerfd_gettime(&copy).map_err(|e| format!("timerfd_gettime: {e}"))?;
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{path}: {e}"))?;
        let st = parse(&text)?;
        if !st.unsettled() {
            return Ok(st);
        }
        last = Some(st);
    }
    last.ok_or_else(|| "no reading".into())
}

pub fn dump(ctx: &mut DumpCtx, d: &mut pb::FileDesc) -> Result<(), String> {
    let mut st = parse(ctx.fdinfo)?;
    if st.unsettled() {
        match settle(ctx.pid, ctx.fd) {
            Ok(s) => st = s,
            Err(e) => tracing::warn!(
                pid = ctx.pid,
                fd = ctx.fd,
                error = %e,
                "could not count the missed periods of an expired timerfd; saving it as due in one period"
            ),
        }
        if st.unsettled() {
            st.value_ns = st.interval_ns;
        }
    }
    d.timerfd = Some(pb::TimerFd {
        clockid: st.clockid,
        ticks: st.ticks,
        settime_flags: st.settime_flags,
        value_ns: st.value_ns,
        interval_ns: st.interval_ns,
    });
    Ok(())
}

/// The clock to read "now" from for an absolute timer on `clockid`.
fn now_clock(clockid: i32) -> i32 {
    match clockid {
        libc::CLOCK_REALTIME_ALARM => libc::CLOCK_REALTIME,
        libc::CLOCK_BOOTTIME_ALARM => libc::CLOCK_BOOTTIME,
        c => c,
    }
}

pub fn restore(d: &pb::FileDesc, _ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    let t = d.timerfd.as_ref().ok_or("the image has no timerfd state for this descriptor")?;
    let flags = if d.flags & libc::O_NONBLOCK as u32 != 0 { libc::TFD_NONBLOCK } else { 0 };
    let fd = fd_event::timerfd_create(t.clockid, flags)
        .map_err(|e| format!("cannot create a timerfd on clock {} ({e})", t.clockid))?;
    let sflags = t.settime_flags & SETTIME_FLAGS;
    if t.value_ns > 0 || t.interval_ns > 0 || sflags != 0 {
        let mut value = t.value_ns;
        if value > 0 && sflags & libc::TFD_TIMER_ABSTIME as u32 != 0 {
            let now = fd_event::clock_now_ns(now_clock(t.clockid))
                .map_err(|e| format!("cannot read clock {} ({e})", t.clockid))?;
            value = now.saturating_add(value);
        }
        fd_event::timerfd_settime(&fd, sflags as i32, value, t.interval_ns).map_err(|e| {
            format!(
                "cannot arm the timerfd ({} ns left, period {} ns, flags {sflags:#o}) ({e})",
                t.value_ns, t.interval_ns
            )
        })?;
    }
    if t.ticks > 0 {
        fd_event::timerfd_set_ticks(&fd, t.ticks)
            .map_err(|e| format!("cannot set {} pending expirations (TFD_IOC_SET_TICKS: {e})", t.ticks))?;
    }
    Ok(fd)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_fdinfo() {
        let text = "pos:\t0\nflags:\t04002\nmnt_id:\t17\nino:\t17\nclockid: 1\nticks: 3\nsettime flags: 03\n\
                    it_value: (1, 49265238)\nit_interval: (0, 100000000)\n";
        let st = parse(text).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            st,
            State { clockid: 1, ticks: 3, settime_flags: 3, value_ns: 1_049_265_238, interval_ns: 100_000_000 }
        );
        assert!(!st.unsettled());
        let expired = State { value_ns: 0, ticks: 1, ..st.clone() };
        assert!(expired.unsettled());
        let disarmed = State { value_ns: 0, ticks: 0, ..st };
        assert!(!disarmed.unsettled());
        assert!(parse("clockid: 1\n").is_err());
        assert_eq!(parse_time("(0, 0)"), Some(0));
        assert_eq!(parse_time("(2, 5)"), Some(2_000_000_005));
        assert_eq!(parse_time("2, 5"), None);
    }
}
