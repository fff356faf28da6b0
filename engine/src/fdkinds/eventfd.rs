//! eventfd descriptors: the counter value and the semaphore mode, read from
//! fdinfo ("eventfd-count: <hex>", "eventfd-semaphore: 0|1").
//!
//! Restore creates `eventfd(0, flags)` and adds the count with one write,
//! which also covers counts above `u32::MAX` (eventfd(2)'s initial value is
//! only an unsigned int).
//!
//! Semaphore mode: kernels before 6.6 do not show "eventfd-semaphore" and
//! there is no other way to query it without changing the counter. On such
//! kernels the descriptor is restored in plain counter mode (by far the
//! common use), the image records `semaphore_known = false`, and the dump
//! logs a warning. The kernel's "eventfd-id" is not preserved.
use super::{DumpCtx, RestoreCtx};
use crate::sys::fd_event;
use floe_proto::image as pb;
use std::os::fd::OwnedFd;

/// Value of the fdinfo line `key` ("key: value", `key` including the colon),
/// trimmed. Shared with the signalfd and timerfd modules.
pub(super) fn fdinfo_value<'a>(fdinfo: &'a str, key: &str) -> Option<&'a str> {
    fdinfo.lines().find_map(|l| l.strip_prefix(key)).map(str::trim)
}

pub fn dump(ctx: &mut DumpCtx, d: &mut pb::FileDesc) -> Result<(), String> {
    let raw = fdinfo_value(ctx.fdinfo, "eventfd-count:").ok_or("its fdinfo has no eventfd-count line")?;
    let count =
        u64::from_str_radix(raw, 16).map_err(|_| format!("cannot parse eventfd-count {raw:?} from its fdinfo"))?;
    let (semaphore, semaphore_known) = match fdinfo_value(ctx.fdinfo, "eventfd-semaphore:") {
        Some(v) => (v != "0", true),
        None => {
            tracing::warn!(
                pid = ctx.pid,
                fd = ctx.fd,
                "the kernel does not show whether this eventfd is in semaphore mode; it will be restored in counter mode"
            );
            (false, false)
        }
    };
    d.eventfd = Some(pb::EventFd { count, semaphore, semaphore_known });
    Ok(())
}

pub fn restore(d: &pb::FileDesc, _ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    let e = d.eventfd.as_ref().ok_or("the image has no eventfd state for this descriptor")?;
    if e.count == u64::MAX {
        return Err("invalid eventfd count 0xffffffffffffffff in the image".into());
    }
    let mut flags = 0;
    if d.flags & libc::O_NONBLOCK as u32 != 0 {
        flags |= libc::EFD_NONBLOCK;
    }
    if e.semaphore {
        flags |= libc::EFD_SEMAPHORE;
    }
    let fd = fd_event::eventfd(flags).map_err(|err| format!("cannot create an eventfd ({err})"))?;
    if e.count > 0 {
        fd_event::eventfd_add(&fd, e.count)
            .map_err(|err| format!("cannot set the eventfd count to {} ({err})", e.count))?;
    }
    Ok(fd)
}
