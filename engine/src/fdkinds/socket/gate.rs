//! Closing a frozen tree's TCP listeners to new connections for the final
//! freeze of a live migration.
//!
//! A listener's kernel keeps completing handshakes while the process is
//! frozen, and a connection waiting in an accept queue cannot be moved (it
//! belongs to no descriptor yet). So at the final freeze every listener gets
//! a socket filter that drops everything: SYNs and the ACKs that would
//! complete a handshake are dropped before TCP sees them, and the clients
//! retransmit (about a second later), by then to wherever the process runs.
//! Connections that were already waiting are accepted by the process itself
//! in short thaws ([`crate::migrate::Source::freeze_final`]).
//!
//! A listener that has a filter of its own is left open (replacing the
//! filter would lose it). Dropped, the gate removes its filters again; a
//! tree that dies keeps them ([`ListenerGate::keep`]).
use super::inet::tcp_listeners;
use crate::sys::fd_socket;
use std::os::fd::OwnedFd;

pub struct ListenerGate {
    /// Listeners (dups of the processes' descriptors) with floe's filter.
    closed: Vec<OwnedFd>,
    /// Listeners left open: they have a filter of their own.
    pub open: usize,
    kept: bool,
}

impl ListenerGate {
    /// Closes the TCP listeners of `pids` (a frozen tree).
    pub fn close(pids: &[i32]) -> Result<Self, String> {
        let mut gate = ListenerGate { closed: Vec::new(), open: 0, kept: false };
        for pid in pids {
            for l in tcp_listeners(*pid) {
                if fd_socket::filter_len(&l).unwrap_or(1) > 0 {
                    gate.open += 1;
                    continue;
                }
                fd_socket::attach_drop_filter(&l)
                    .map_err(|e| format!("cannot close a TCP listener of process {pid} to new connections ({e})"))?;
                gate.closed.push(l);
            }
        }
        Ok(gate)
    }

    /// How many listeners floe closed.
    pub fn closed(&self) -> usize {
        self.closed.len()
    }

    /// Connections waiting in the accept queues of the closed listeners.
    pub fn waiting(&self) -> u32 {
        self.closed.iter().filter_map(|l| fd_socket::tcp_state(l).ok()).map(|st| st.accept_queue).sum()
    }

    /// The tree dies with its listeners: nothing to undo.
    pub fn keep(mut self) {
        self.kept = true;
    }
}

impl Drop for ListenerGate {
    fn drop(&mut self) {
        if self.kept {
            return;
        }
        for l in &self.closed {
            if let Err(e) = fd_socket::detach_filter(l) {
                tracing::error!(error = %e, "cannot open a TCP listener again after an aborted migration");
            }
        }
    }
}
