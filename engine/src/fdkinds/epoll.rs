//! epoll descriptors (not supported yet: refused at dump time).
use super::{DumpCtx, RestoreCtx};
use floe_proto::image as pb;
use std::os::fd::OwnedFd;

pub fn dump(_ctx: &mut DumpCtx, _d: &mut pb::FileDesc) -> Result<(), String> {
    Err("epoll descriptors are not supported yet".into())
}

pub fn restore(_d: &pb::FileDesc, _ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    Err("epoll descriptors are not supported yet".into())
}
