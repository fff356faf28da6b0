//! signalfd descriptors: only the signal mask (fdinfo "sigmask: <hex>",
//! bit N-1 = signal N) is state of the descriptor. The signals it reads are
//! the pending signals of whichever process reads it, which are dumped and
//! restored with the process itself; so a signalfd created in floe with
//! `signalfd(-1, &mask, flags)` behaves the same once handed over.
use super::eventfd::fdinfo_value;
use super::{DumpCtx, RestoreCtx};
use crate::sys::fd_event;
use floe_proto::image as pb;
use std::os::fd::OwnedFd;

pub fn dump(ctx: &mut DumpCtx, d: &mut pb::FileDesc) -> Result<(), String> {
    let raw = fdinfo_value(ctx.fdinfo, "sigmask:").ok_or("its fdinfo has no sigmask line")?;
    let sigmask = u64::from_str_radix(raw, 16).map_err(|_| format!("cannot parse sigmask {raw:?} from its fdinfo"))?;
    d.signalfd = Some(pb::SignalFd { sigmask });
    Ok(())
}

pub fn restore(d: &pb::FileDesc, _ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    let s = d.signalfd.as_ref().ok_or("the image has no signalfd state for this descriptor")?;
    let flags = if d.flags & libc::O_NONBLOCK as u32 != 0 { libc::SFD_NONBLOCK } else { 0 };
    fd_event::signalfd(s.sigmask, flags)
        .map_err(|e| format!("cannot create a signalfd for mask {:#x} ({e})", s.sigmask))
}
