//! System V shared memory segments: found on this host or recreated with
//! the same id (kernel.shm_next_id), before processes attach them.
use super::RestoreError;
use crate::sys::task;
use floe_proto::image as pb;

const SHM_DEST: u32 = 0o1000;
const NEXT_ID: &str = "/proc/sys/kernel/shm_next_id";

/// (key, size) of an existing segment.
fn existing(shmid: i32) -> Option<(i32, u64)> {
    let text = std::fs::read_to_string("/proc/sysvipc/shm").ok()?;
    text.lines().skip(1).find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() <= 3 || f[1].parse::<i32>().ok()? != shmid {
            return None;
        }
        Some((f[0].parse::<i64>().ok()? as i32, f[3].parse().ok()?))
    })
}

pub fn ensure_segments(segs: &[pb::SysvShm]) -> Result<(), RestoreError> {
    for s in segs {
        match existing(s.shmid) {
            Some((key, size)) if key == s.key && size == s.size => continue,
            Some((key, size)) => {
                return Err(RestoreError::Refused {
                    what: format!(
                        "System V shm id {} is taken on this host by another segment (key {key:#x}, {size} bytes; the image's has key {:#x}, {} bytes)",
                        s.shmid, s.key, s.size
                    ),
                })
            }
            None => {}
        }
        std::fs::write(NEXT_ID, s.shmid.to_string()).map_err(|e| RestoreError::Refused {
            what: format!("cannot choose System V shm id {} ({NEXT_ID}: {e})", s.shmid),
        })?;
        let key = if s.key == 0 { libc::IPC_PRIVATE } else { s.key };
        let r = task::shmget(key, s.size, libc::IPC_CREAT | libc::IPC_EXCL | 0o600);
        let _ = std::fs::write(NEXT_ID, "-1");
        let id = r.map_err(|e| RestoreError::Refused {
            what: format!("cannot recreate System V shm segment {} (key {:#x}): {e}", s.shmid, s.key),
        })?;
        if id != s.shmid {
            let _ = task::shm_remove(id);
            return Err(RestoreError::Refused { what: format!("System V shm segment {} came back as {id}", s.shmid) });
        }
        task::shm_set_owner(id, s.uid, s.gid, s.mode).map_err(|e| RestoreError::Refused {
            what: format!("cannot set owner/mode of System V shm segment {id}: {e}"),
        })?;
    }
    Ok(())
}

/// Segments that were marked for removal go away once detached again.
pub fn remove_destroyed(segs: &[pb::SysvShm]) {
    for s in segs.iter().filter(|s| s.mode & SHM_DEST != 0) {
        if let Err(e) = task::shm_remove(s.shmid) {
            tracing::warn!(shmid = s.shmid, error = %e, "could not mark System V segment for removal");
        }
    }
}
