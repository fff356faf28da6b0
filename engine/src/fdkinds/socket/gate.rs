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
//! filter would lose it). Dropped, the gate removes its filters again:
//! before a tree that runs on is resumed, and after a tree that dies is
//! killed (a listener it shared with a process outside the tree, as with
//! socket activation, then takes connections there again; any other is
//! closed once the gate's own descriptors go).
use crate::sys::fd_socket;
use std::os::fd::OwnedFd;

pub struct ListenerGate {
    /// Listeners (dups of the processes' descriptors) with floe's filter.
    closed: Vec<OwnedFd>,
    /// Listeners left open: they have a filter of their own.
    pub open: usize,
}

impl ListenerGate {
    /// Closes `listeners` (dups of a frozen tree's listening sockets, found
    /// by [`super::at_freeze`]), but those with a filter of their own.
    pub fn close(listeners: Vec<OwnedFd>) -> std::io::Result<Self> {
        let mut gate = ListenerGate { closed: Vec::new(), open: 0 };
        for l in listeners {
            if fd_socket::filter_len(&l).unwrap_or(1) > 0 {
                gate.open += 1;
                continue;
            }
            fd_socket::attach_filter(&l, 0)?;
            gate.closed.push(l);
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
}

impl Drop for ListenerGate {
    fn drop(&mut self) {
        for l in &self.closed {
            if let Err(e) = fd_socket::detach_filter(l) {
                tracing::error!(error = %e, "cannot remove floe's filter from a TCP listener");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};
    use std::os::fd::AsFd;
    use std::time::Duration;

    /// Whether a connection to `addr` completes within `ms`.
    fn connects(addr: std::net::SocketAddr, ms: u64) -> bool {
        TcpStream::connect_timeout(&addr, Duration::from_millis(ms)).is_ok()
    }

    fn gate_for(l: &TcpListener) -> ListenerGate {
        ListenerGate::close(vec![l.as_fd().try_clone_to_owned().expect("dup")]).expect("close")
    }

    #[test]
    fn a_closed_listener_completes_no_handshake_until_the_gate_goes() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("address");
        let gate = gate_for(&l);
        assert_eq!((gate.closed(), gate.open), (1, 0));
        assert!(!connects(addr, 300), "a handshake completed on a closed listener");
        assert_eq!(gate.waiting(), 0, "a connection got into the accept queue");
        drop(gate);
        assert!(connects(addr, 2000), "the listener takes no connection after the gate went");
    }

    #[test]
    fn a_listener_with_its_own_filter_is_left_open() {
        let l = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = l.local_addr().expect("address");
        // The process's own filter: accept every packet whole.
        fd_socket::attach_filter(&l, u32::MAX).expect("attach");
        let gate = gate_for(&l);
        assert_eq!((gate.closed(), gate.open), (0, 1));
        assert!(connects(addr, 2000), "a listener with its own filter was closed");
        drop(gate);
        assert_eq!(fd_socket::filter_len(&l).expect("filter"), 1, "the process's own filter is gone");
    }
}
