//! The agent's shared state: configuration, QUIC endpoint, journal and the
//! migrations in flight (for `floe status`).
use crate::config::AgentConfig;
use crate::journal::Journal;
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Mutex;

/// A migration in flight, as `floe status` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct InFlight {
    pub id: String,
    pub role: &'static str,
    pub pid: i32,
    pub peer: String,
    pub phase: String,
    pub pass: u32,
    pub bytes_sent: u64,
    pub started_unix_ms: u64,
}

impl InFlight {
    /// A migration starting now.
    pub fn new(id: &str, role: &'static str, pid: i32, peer: &str, phase: &str) -> Self {
        let started_unix_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        InFlight {
            id: id.to_string(),
            role,
            pid,
            peer: peer.to_string(),
            phase: phase.to_string(),
            pass: 0,
            bytes_sent: 0,
            started_unix_ms,
        }
    }
}

/// Test hooks, read from `FLOE_TEST_HOOK` at start (tests only; see docs/protocol.md).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Hooks {
    /// Target: exit the agent when pass 1 starts / the final image arrives /
    /// before "ready" / after journalling "releasing" (tree still stopped) /
    /// after "released" (tree running, before "done").
    pub exit_at: Option<String>,
    /// Source: corrupt the n-th page batch (from 1).
    pub corrupt_batch: Option<u64>,
    /// Source: claim another protocol version in hello.
    pub protocol_version: Option<u32>,
}

impl Hooks {
    pub fn from_env() -> Self {
        let mut h = Hooks::default();
        let Ok(v) = std::env::var("FLOE_TEST_HOOK") else { return h };
        for item in v.split(',') {
            match item.split_once('=') {
                Some(("exit-at", w)) => h.exit_at = Some(w.to_string()),
                Some(("corrupt-batch", n)) => h.corrupt_batch = n.parse().ok(),
                Some(("protocol-version", n)) => h.protocol_version = n.parse().ok(),
                _ => tracing::warn!(hook = item, "unknown test hook ignored"),
            }
        }
        if h != Hooks::default() {
            tracing::warn!(hooks = ?h, "TEST HOOKS ACTIVE: this agent misbehaves on purpose");
        }
        h
    }

    /// Exits the process at `point` if asked to (simulates an agent crash).
    pub fn maybe_exit(&self, point: &str) {
        if self.exit_at.as_deref() == Some(point) {
            tracing::error!(point, "test hook: agent exits now");
            std::process::exit(99);
        }
    }
}

pub struct Agent {
    pub cfg: AgentConfig,
    pub endpoint: quinn::Endpoint,
    pub journal: Journal,
    pub in_flight: Mutex<BTreeMap<String, InFlight>>,
    pub hooks: Hooks,
    pub identity: crate::tls::Identity,
    /// Transport tuning from the configuration (the MTU is adapted per peer).
    pub tuning: crate::tls::Tuning,
    /// Scratch space for final images (tmpfs when available).
    pub run_dir: PathBuf,
}

impl Agent {
    pub fn set_phase(&self, id: &str, phase: &str, pass: u32, bytes: u64) {
        if let Ok(mut m) = self.in_flight.lock() {
            if let Some(e) = m.get_mut(id) {
                e.phase = phase.to_string();
                e.pass = pass;
                e.bytes_sent = bytes;
            }
        }
    }

    pub fn begin(&self, e: InFlight) {
        if let Ok(mut m) = self.in_flight.lock() {
            m.insert(e.id.clone(), e);
        }
    }

    pub fn end(&self, id: &str) {
        if let Ok(mut m) = self.in_flight.lock() {
            m.remove(id);
        }
    }

    pub fn list(&self) -> Vec<InFlight> {
        self.in_flight.lock().map(|m| m.values().cloned().collect()).unwrap_or_default()
    }
}

/// Drops `t` on a thread of its own: closing a netlink socket (a network
/// lock's, a capture's) can take the kernel ~10 ms, which the downtime
/// must not include.
pub fn drop_elsewhere<T: Send + 'static>(t: T) {
    drop(std::thread::spawn(move || drop(t)));
}
