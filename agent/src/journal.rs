//! The durable record of each migration's outcome, one small file per
//! migration under `<data_dir>/migrations/`. The handover protocol reads it
//! to answer a peer that lost the connection (docs/protocol.md, "In doubt").
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Entry {
    pub id: String,
    /// "source" or "target".
    pub role: String,
    /// The migrated root pid (as the process sees it).
    pub pid: i32,
    /// The host pid of the copy on this host (target), for liveness checks.
    pub host_pid: i32,
    /// Its start time (field 22 of /proc/PID/stat), so a reused pid is not taken for it.
    pub start_time: u64,
    pub peer: String,
    /// The peer's address (to ask it again after a restart).
    #[serde(default)]
    pub peer_addr: String,
    /// Source: every process of the tree (host pids), to kill or continue them all.
    #[serde(default)]
    pub tree_pids: Vec<i32>,
    /// Source: "started", "committing", "committed", "aborted".
    /// Target: "receiving", "ready", "releasing", "released", "discarded".
    pub state: String,
    pub updated_unix_ms: u64,
}

pub struct Journal {
    dir: PathBuf,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Field 22 (start time) of /proc/PID/stat.
pub fn start_time(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &s[s.rfind(')')? + 2..];
    after.split_whitespace().nth(19)?.parse().ok()
}

impl Journal {
    pub fn open(data_dir: &Path) -> std::io::Result<Self> {
        let dir = data_dir.join("migrations");
        std::fs::create_dir_all(&dir)?;
        Ok(Self { dir })
    }

    fn path(&self, id: &str) -> PathBuf {
        // Ids are hex made here or checked by `valid_id`.
        self.dir.join(format!("{id}.json"))
    }

    /// Writes `e` atomically (tmp file, rename). Not fsynced: the journal
    /// must survive a crash of the agent, which the page cache does; a
    /// crash of the host ends the processes it is about as well, so nothing
    /// would be left to decide (and an fsync here sits in the downtime).
    pub fn record(&self, e: &mut Entry) -> std::io::Result<()> {
        e.updated_unix_ms = now_ms();
        let tmp = self.dir.join(format!(".{}.tmp", e.id));
        std::fs::write(&tmp, serde_json::to_vec_pretty(e).map_err(std::io::Error::other)?)?;
        std::fs::rename(&tmp, self.path(&e.id))
    }

    pub fn get(&self, id: &str) -> Option<Entry> {
        if !valid_id(id) {
            return None;
        }
        serde_json::from_slice(&std::fs::read(self.path(id)).ok()?).ok()
    }

    /// Every entry (for `floe status` after a restart).
    pub fn all(&self) -> Vec<Entry> {
        let Ok(rd) = std::fs::read_dir(&self.dir) else { return Vec::new() };
        rd.flatten()
            .filter(|d| d.file_name().to_string_lossy().ends_with(".json"))
            .filter_map(|d| serde_json::from_slice(&std::fs::read(d.path()).ok()?).ok())
            .collect()
    }
}

/// A migration id as this protocol makes them: 32 lowercase hex digits.
pub fn valid_id(id: &str) -> bool {
    id.len() == 32 && id.bytes().all(|b| b.is_ascii_hexdigit() && !b.is_ascii_uppercase())
}

/// A fresh migration id.
pub fn new_id() -> String {
    let seed = std::fs::read("/proc/sys/kernel/random/uuid").unwrap_or_default();
    let h = blake3::hash(&[seed.as_slice(), &now_ms().to_le_bytes()].concat());
    h.as_bytes()[..16].iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_and_read_back() {
        let d = tempfile::tempdir().expect("tempdir");
        let j = Journal::open(d.path()).expect("open");
        let id = new_id();
        assert!(valid_id(&id));
        assert!(!valid_id("../etc/passwd"));
        let mut e = Entry {
            id: id.clone(),
            role: "target".into(),
            pid: 5,
            host_pid: 6,
            start_time: 7,
            peer: "a".into(),
            peer_addr: String::new(),
            tree_pids: Vec::new(),
            state: "ready".into(),
            updated_unix_ms: 0,
        };
        j.record(&mut e).expect("record");
        assert_eq!(j.get(&id), Some(e.clone()));
        e.state = "released".into();
        j.record(&mut e).expect("record");
        assert_eq!(j.get(&id).map(|e| e.state), Some("released".into()));
        assert_eq!(j.all().len(), 1);
        assert!(j.get("0123").is_none());
    }
}
