//! memfd descriptors: name, contents, seals. A memfd that is also mapped is
//! the same object as the mapping (matched by shmem inode), created once.
use super::{DumpCtx, RestoreCtx};
use crate::procfs;
use crate::sys::{fd_memfd, task};
use floe_proto::image as pb;
use std::os::fd::{AsRawFd, OwnedFd};
use std::os::unix::fs::{FileExt, MetadataExt};

pub fn dump(ctx: &mut DumpCtx, d: &mut pb::FileDesc) -> Result<(), String> {
    let name = ctx.link.strip_prefix("/memfd:").unwrap_or(ctx.link);
    let name = name.strip_suffix(" (deleted)").unwrap_or(name).to_string();
    let path = procfs::path(ctx.pid, &format!("fd/{}", ctx.fd));
    let meta = std::fs::metadata(&path).map_err(|e| format!("cannot stat the memfd ({e})"))?;
    let pidfd = task::pidfd_open(ctx.pid).map_err(|e| format!("pidfd_open failed ({e})"))?;
    let own = task::pidfd_getfd(&pidfd, ctx.fd).map_err(|e| format!("pidfd_getfd failed ({e})"))?;
    let seals = fd_memfd::get_seals(&own).unwrap_or(0);
    let mut data = Vec::with_capacity(meta.len() as usize);
    let f = std::fs::File::from(own);
    let mut off = 0u64;
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read_at(&mut buf, off).map_err(|e| format!("cannot read the memfd ({e})"))?;
        if n == 0 {
            break;
        }
        data.extend_from_slice(&buf[..n]);
        off += n as u64;
    }
    d.path = format!("memfd:{name}");
    d.blob = ctx.blobs.len() as i32;
    ctx.blobs.push(data);
    d.memfd = Some(pb::MemFd { name, blob: d.blob, seals, size: meta.size(), shmem_id: meta.ino() });
    Ok(())
}

pub fn restore(d: &pb::FileDesc, ctx: &mut RestoreCtx) -> Result<OwnedFd, String> {
    let m = d.memfd.as_ref().ok_or("memfd record missing")?;
    let key = format!("memfd:{}", m.shmem_id);
    if !ctx.stash.contains_key(&key) {
        let obj = match ctx.shm.get(&m.shmem_id) {
            Some(o) => o.try_clone().map_err(|e| format!("dup failed ({e})"))?,
            None => {
                let o =
                    fd_memfd::memfd_create(&m.name, m.seals != 0).map_err(|e| format!("memfd_create failed ({e})"))?;
                std::fs::File::from(o.try_clone().map_err(|e| format!("dup failed ({e})"))?)
                    .set_len(m.size)
                    .map_err(|e| format!("cannot size the memfd ({e})"))?;
                o
            }
        };
        let data = ctx.img.read_blob(m.blob as usize).map_err(|e| e.to_string())?;
        let f = std::fs::File::from(obj.try_clone().map_err(|e| format!("dup failed ({e})"))?);
        f.write_all_at(&data, 0).map_err(|e| format!("cannot refill the memfd ({e})"))?;
        // F_SEAL_SEAL and friends: applied last; an object sealed already says EPERM.
        if m.seals != 0 {
            let _ = fd_memfd::add_seals(&obj, m.seals);
        }
        ctx.stash.insert(key.clone(), obj);
    }
    let obj = ctx.stash.get(&key).ok_or("memfd vanished")?;
    let p = format!("/proc/self/fd/{}", obj.as_raw_fd());
    let flags = (d.flags & !((libc::O_CREAT | libc::O_EXCL | libc::O_TRUNC) as u32)) as i32;
    let fd = task::open_raw(&p, flags).map_err(|e| format!("cannot reopen the memfd ({e})"))?;
    if d.pos != 0 {
        task::seek_to(&fd, d.pos).map_err(|e| format!("cannot seek to {} ({e})", d.pos))?;
    }
    Ok(fd)
}
