//! epoll descriptors: every registration (watched descriptor number, event
//! mask, data) and the busy-poll parameters.
//!
//! Dump: the registrations come from the fdinfo "tfd:" lines; each is checked
//! with kcmp(KCMP_EPOLL_TFD) to still be the description open at that number
//! (`resolve_epoll` then maps the number to a description index).
//!
//! Restore (after every other description): a new epoll gets each
//! registration added under the descriptor number the process uses, so
//! EPOLL_CTL_MOD/DEL from the restored process find it. An epoll watching an
//! epoll that comes later in the image is built early and parked in the stash
//! until its own turn.
use super::{DumpCtx, RestoreCtx};
use crate::sys::{fd_epoll, task};
use floe_proto::image as pb;
use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, OwnedFd};

/// The kernel refuses deeper epoll nesting (EP_MAX_NESTS).
const MAX_NESTING: usize = 5;

/// Splits fdinfo fields "key: value" / "key:value" into pairs.
fn fields(line: &str) -> HashMap<&str, &str> {
    let mut out = HashMap::new();
    let mut toks = line.split_whitespace();
    while let Some(t) = toks.next() {
        if let Some(k) = t.strip_suffix(':') {
            if let Some(v) = toks.next() {
                out.insert(k, v);
            }
        } else if let Some((k, v)) = t.split_once(':') {
            out.insert(k, v);
        }
    }
    out
}

fn parse_item(line: &str) -> Option<pb::EpollItem> {
    let f = fields(line);
    Some(pb::EpollItem {
        file: 0,
        tfd: f.get("tfd")?.parse().ok()?,
        events: u32::from_str_radix(f.get("events")?, 16).ok()?,
        data: u64::from_str_radix(f.get("data")?, 16).ok()?,
        ino: f.get("ino").and_then(|v| u64::from_str_radix(v, 16).ok()).unwrap_or(0),
    })
}

pub fn dump(ctx: &mut DumpCtx, d: &mut pb::FileDesc) -> Result<(), String> {
    let mut items = Vec::new();
    // How many earlier registrations had the same number (kcmp's "toff").
    let mut seen: HashMap<i32, u32> = HashMap::new();
    for line in ctx.fdinfo.lines().filter(|l| l.starts_with("tfd:")) {
        let item = parse_item(line).ok_or_else(|| format!("unexpected epoll fdinfo line {line:?}"))?;
        let toff = seen.entry(item.tfd).or_insert(0);
        check_registration(ctx, &item, *toff)?;
        *toff += 1;
        items.push(item);
    }
    let params = task::pidfd_open(ctx.pid)
        .and_then(|p| task::pidfd_getfd(&p, ctx.fd))
        .and_then(|own| fd_epoll::get_params(&own))
        .unwrap_or_default();
    d.epoll = Some(pb::Epoll {
        items,
        busy_poll_usecs: params.busy_poll_usecs,
        busy_poll_budget: params.busy_poll_budget.into(),
        prefer_busy_poll: params.prefer_busy_poll != 0,
    });
    Ok(())
}

/// Refuses a registration whose descriptor number was closed (or reused for
/// another file) since: it could not be re-created under that number.
fn check_registration(ctx: &DumpCtx, item: &pb::EpollItem, toff: u32) -> Result<(), String> {
    let tfd = item.tfd;
    let stale = || {
        format!(
            "it watches a file registered as fd {tfd} (inode {}) that is no longer open under that number; \
             such a registration cannot be restored",
            item.ino
        )
    };
    match fd_epoll::registered_is_open(ctx.pid, ctx.fd, tfd, toff) {
        Ok(true) => Ok(()),
        Ok(false) => Err(stale()),
        Err(e) if matches!(e.raw_os_error(), Some(libc::EBADF | libc::ENOENT)) => Err(stale()),
        Err(_) => {
            // kcmp without KCMP_EPOLL_TFD: compare inode numbers instead.
            use std::os::unix::fs::MetadataExt;
            let p = crate::procfs::path(ctx.pid, &format!("fd/{tfd}"));
            match std::fs::metadata(p) {
                Ok(m) if m.ino() == item.ino => Ok(()),
                _ => Err(stale()),
            }
        }
    }
}

fn stash_key(idx: usize) -> String {
    format!("epoll:{idx}")
}

pub fn restore(d: &pb::FileDesc, ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    // Built earlier because another epoll watches it?
    if let Some(i) = ctx.img.manifest.files.iter().position(|f| std::ptr::eq(f, d)) {
        if let Some(fd) = ctx.stash.remove(&stash_key(i)) {
            return Ok(fd);
        }
    }
    build(d, ctx, 0)
}

fn build(d: &pb::FileDesc, ctx: &mut RestoreCtx, depth: usize) -> Result<OwnedFd, String> {
    let ep = d.epoll.as_ref().ok_or("epoll record missing")?;
    if depth > MAX_NESTING {
        return Err("epoll instances nested too deeply".into());
    }
    let img = ctx.img;
    // Watched epolls not opened yet come first.
    for item in &ep.items {
        let j = item.file as usize;
        if ctx.opened.get(j).is_some_and(Option::is_some) || ctx.stash.contains_key(&stash_key(j)) {
            continue;
        }
        let target = img.manifest.files.get(j).ok_or_else(|| format!("fd {}: no description #{j}", item.tfd))?;
        if target.kind != pb::FdKind::Epoll as i32 {
            return Err(format!("fd {} (description #{j}, {}) was not restored", item.tfd, target.path));
        }
        let inner = build(target, ctx, depth + 1)?;
        ctx.stash.insert(stash_key(j), inner);
    }
    let mut regs = Vec::with_capacity(ep.items.len());
    for item in &ep.items {
        let j = item.file as usize;
        let src = match ctx.opened.get(j).and_then(Option::as_ref) {
            Some(fd) => fd.as_raw_fd(),
            None => ctx
                .stash
                .get(&stash_key(j))
                .map(AsRawFd::as_raw_fd)
                .ok_or_else(|| format!("fd {} (description #{j}) was not restored", item.tfd))?,
        };
        regs.push(fd_epoll::Registration { src, tfd: item.tfd, events: item.events, data: item.data });
    }
    let fd = fd_epoll::epoll_create().map_err(|e| format!("epoll_create1 failed ({e})"))?;
    fd_epoll::add_at_numbers(fd.as_fd(), &regs).map_err(|(i, e)| match i.and_then(|i| ep.items.get(i)) {
        Some(item) => format!(
            "cannot register fd {} (events {:#x}, data {:#x}) in the epoll ({e})",
            item.tfd, item.events, item.data
        ),
        None => format!("cannot register the epoll's descriptors ({e})"),
    })?;
    if ep.busy_poll_usecs != 0 || ep.busy_poll_budget != 0 || ep.prefer_busy_poll {
        let budget = u16::try_from(ep.busy_poll_budget).map_err(|_| "busy-poll budget out of range")?;
        let p = fd_epoll::EpollParams::new(ep.busy_poll_usecs, budget, ep.prefer_busy_poll.into());
        fd_epoll::set_params(&fd, &p).map_err(|e| format!("cannot set the busy-poll parameters ({e})"))?;
    }
    if d.flags & libc::O_NONBLOCK as u32 != 0 {
        task::fcntl_int(&fd, libc::F_SETFL, libc::O_NONBLOCK).map_err(|e| format!("cannot set O_NONBLOCK ({e})"))?;
    }
    Ok(fd)
}
