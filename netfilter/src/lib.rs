//! floe's network lock: nf_tables rules that hold the TCP connections of a
//! process while it migrates.
//!
//! While a process is frozen and its sockets are dumped (and later while they
//! are restored), no packet of its TCP connections may reach or leave the
//! host's stack: an incoming segment would be answered with a RST or an ACK
//! that moves the sequence numbers past what was dumped, and an outgoing one
//! would do the same to the peer. The lock drops them instead; the peers
//! retransmit after [`Lock::unlock`], to wherever the connection then lives.
//!
//! The crate speaks nf_tables over `NETLINK_NETFILTER` itself: no `nft`
//! process (12–24 ms per run), no libnftnl. Every change is one atomic
//! netlink batch (`NFNL_MSG_BATCH_BEGIN` … `NFNL_MSG_BATCH_END`) whose every
//! message asks for an acknowledgement, sent in one datagram; the kernel
//! applies all of it or none, and the error names the message it refused.
//!
//! # Table layout
//!
//! [`Lock::prepare`] creates, in one batch, what `nft` would print as
//!
//! ```text
//! table inet floe_NAME {
//!     set conns4 { type ipv4_addr . inet_service . ipv4_addr . inet_service; }
//!     set conns6 { type ipv6_addr . inet_service . ipv6_addr . inet_service; }
//!     chain prerouting {
//!         type filter hook prerouting priority -300; policy accept;
//!         meta mark MARK accept
//!         ip saddr . tcp sport . ip daddr . tcp dport @conns4 drop
//!         ip6 saddr . tcp sport . ip6 daddr . tcp dport @conns6 drop
//!     }
//!     chain output {
//!         type filter hook output priority -300; policy accept;
//!         meta mark MARK accept
//!         ip daddr . tcp dport . ip saddr . tcp sport @conns4 drop
//!         ip6 daddr . tcp dport . ip6 saddr . tcp sport @conns6 drop
//!     }
//! }
//! ```
//!
//! Both sets are keyed by (remote address, remote port, local address, local
//! port), so one element per connection covers both directions: incoming
//! packets come from the remote end, output packets go to it. In a
//! concatenation every component starts in a fresh 32-bit register, so a
//! port takes 4 bytes (big-endian, then two zero bytes) and the keys are 16
//! and 40 bytes. Each connection rule first requires `meta nfproto` (the
//! `inet` family sees both IP versions) and `meta l4proto tcp` (which skips
//! IPv6 extension headers). The sets start empty; [`Lock::lock`] adds the
//! connections just before the process is frozen, in one batch.
//!
//! # Why priority -300
//!
//! Base chains at -300 run before connection tracking (-200), like the
//! `raw` table: a dropped packet is never seen by conntrack, so it creates no
//! entry, does not advance the tracked TCP window and is never marked
//! invalid (which could make other rulesets reject later packets of the
//! connection once it is restored). They also run before the usual filter
//! and NAT chains (0, -100), so a `reject` elsewhere cannot answer a locked
//! packet with a RST first. A drop is final whatever other tables say.
//!
//! # The mark
//!
//! The first rule of each chain accepts packets whose `skb->mark` equals
//! the lock's mark, before any connection is looked up. floe sets that mark
//! (`SO_MARK`) on its own sockets, so it can still send on a locked 4-tuple,
//! e.g. to prompt the peer as soon as a connection is restored, while
//! everything else on it stays blocked. The mark is per packet: only the
//! marked socket's own packets carry it. Packets arriving from the network
//! have mark 0 unless something (a rule, `ct mark`) sets it; over loopback
//! they keep the sender's mark. Mark 0 is refused, as it would exempt every
//! unmarked packet.
//!
//! # Network namespace
//!
//! Every netlink socket is opened in the network namespace of the calling
//! **thread** at the time of the call (`setns`/`unshare(CLONE_NEWNET)` are
//! per thread). A [`Lock`] keeps the socket it was prepared with, so
//! [`Lock::lock`], [`Lock::unlock`] and its `Drop` act on the namespace
//! where [`Lock::prepare`] ran, from whichever thread calls them.
//! [`remove_stale`] and [`table_exists`] use the caller's current namespace.
//!
//! # Ownership and crashes
//!
//! The tables are not tied to the netlink socket (`NFT_TABLE_F_OWNER` is not
//! used): if floe dies while connections are locked, they stay locked, so
//! that packets never reach a socket whose state has already been handed
//! over. floe finds its tables by name prefix ([`TABLE_PREFIX`]) and removes
//! leftovers with [`remove_stale`] when its agent starts.
//!
//! Everything here needs `CAP_NET_ADMIN` in the user namespace owning the
//! network namespace, and the `nf_tables` module.

mod capture;
mod datagram;
mod error;
mod msg;
mod netlink;
mod nft;
pub mod rtnl;
mod sys;

pub use capture::{reinject, Capture, Segment};
pub use datagram::{deliver_udp, udp_packet, Datagram};
pub use error::{Errno, NetfilterError};
pub use nft::PRIORITY;

use netlink::Socket;
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Every lock table's name starts with this; [`remove_stale`] only deletes
/// tables under it.
pub const TABLE_PREFIX: &str = "floe_";

/// `NFT_NAME_MAXLEN` less the terminating NUL.
const MAX_NAME_LEN: usize = 255;

/// One TCP connection as seen from this host. Both ends are IPv4 or both
/// IPv6; IPv4-mapped IPv6 addresses (`::ffff:a.b.c.d`, what a dual-stack
/// socket reports for an IPv4 peer) are treated as the IPv4 addresses they
/// carry on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnTuple {
    pub local: SocketAddr,
    pub remote: SocketAddr,
}

impl ConnTuple {
    pub fn new(local: SocketAddr, remote: SocketAddr) -> Self {
        ConnTuple { local, remote }
    }

    /// The same connection with IPv4-mapped IPv6 addresses written as the
    /// IPv4 addresses they carry on the wire (how packets show them).
    pub fn on_the_wire(&self) -> ConnTuple {
        let f = |a: SocketAddr| SocketAddr::new(unmap(a.ip()), a.port());
        ConnTuple { local: f(self.local), remote: f(self.remote) }
    }
}

impl fmt::Display for ConnTuple {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "local {} remote {}", self.local, self.remote)
    }
}

/// A connection's set key: (remote address, remote port, local address,
/// local port), each port padded to 4 bytes.
enum Key {
    V4([u8; nft::V4.key_len() as usize]),
    V6([u8; nft::V6.key_len() as usize]),
}

/// An IPv4-mapped IPv6 address as the IPv4 address it is on the wire.
fn unmap(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

fn put_port(key: &mut [u8], at: usize, port: u16) {
    key[at..at + 2].copy_from_slice(&port.to_be_bytes());
}

impl Key {
    fn of(t: &ConnTuple) -> Result<Key, NetfilterError> {
        let invalid = |reason| NetfilterError::InvalidTuple { tuple: *t, reason };
        let (local, remote) = (unmap(t.local.ip()), unmap(t.remote.ip()));
        if t.local.port() == 0 || t.remote.port() == 0 {
            return Err(invalid("port 0"));
        }
        if local.is_unspecified() || remote.is_unspecified() {
            return Err(invalid("unspecified address"));
        }
        let (lp, rp) = (t.local.port(), t.remote.port());
        match (local, remote) {
            (IpAddr::V4(l), IpAddr::V4(r)) => {
                let mut k = [0; nft::V4.key_len() as usize];
                k[0..4].copy_from_slice(&r.octets());
                put_port(&mut k, 4, rp);
                k[8..12].copy_from_slice(&l.octets());
                put_port(&mut k, 12, lp);
                Ok(Key::V4(k))
            }
            (IpAddr::V6(l), IpAddr::V6(r)) => {
                let mut k = [0; nft::V6.key_len() as usize];
                k[0..16].copy_from_slice(&r.octets());
                put_port(&mut k, 16, rp);
                k[20..36].copy_from_slice(&l.octets());
                put_port(&mut k, 36, lp);
                Ok(Key::V6(k))
            }
            _ => Err(invalid("local and remote addresses are of different IP versions")),
        }
    }
}

/// Checks a table name (or name prefix) for what nf_tables and the `nft`
/// CLI accept without trouble: 1 to 255 ASCII letters, digits, `_`, `-`.
fn check_charset(name: &str) -> Result<(), NetfilterError> {
    let invalid = |reason| NetfilterError::InvalidName { name: name.to_owned(), reason };
    if name.is_empty() {
        return Err(invalid("empty"));
    }
    if name.len() > MAX_NAME_LEN {
        return Err(invalid("longer than 255 bytes"));
    }
    if !name.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-') {
        return Err(invalid("only ASCII letters, digits, '_' and '-' are allowed"));
    }
    Ok(())
}

/// A lock table's name: [`TABLE_PREFIX`] and at least one more character.
fn check_table_name(name: &str) -> Result<(), NetfilterError> {
    check_charset(name)?;
    let invalid = |reason| NetfilterError::InvalidName { name: name.to_owned(), reason };
    if !name.starts_with(TABLE_PREFIX) {
        return Err(invalid("floe's tables must start with \"floe_\""));
    }
    if name.len() == TABLE_PREFIX.len() {
        return Err(invalid("nothing follows the \"floe_\" prefix"));
    }
    Ok(())
}

/// Locks the mutex even if a panicking thread poisoned it: the socket holds
/// no state a panic could leave half-updated (each request stands alone).
fn lock_socket(m: &Mutex<Socket>) -> MutexGuard<'_, Socket> {
    m.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Deletes `table` in one batch; returns whether it existed (a table that
/// is already gone is fine).
fn delete_table(sock: &mut Socket, table: &str) -> Result<bool, NetfilterError> {
    let mut b = sock.batch(format!("deleting nftables table {table}"), 128);
    nft::delete_table(&mut b, table);
    match sock.transact(b) {
        Ok(()) => Ok(true),
        Err(e) if e.errno() == Some(libc::ENOENT) => {
            tracing::debug!(table, "nftables table already gone");
            Ok(false)
        }
        Err(e) => Err(e),
    }
}

/// A prepared network lock: the table `inet NAME` with its chains, rules and
/// (initially empty) sets. Dropping it deletes the table (best effort).
#[derive(Debug)]
pub struct Lock {
    table: String,
    mark: u32,
    sock: Mutex<Socket>,
    /// The table is ours to delete (not yet unlocked).
    armed: bool,
}

impl Lock {
    /// Creates table `inet name` (which must start with [`TABLE_PREFIX`])
    /// with the prerouting and output chains, their rules and the empty sets,
    /// in one atomic batch, in the calling thread's network namespace.
    /// Packets carrying `mark` (non-zero) always pass.
    ///
    /// Fails with `EEXIST` if the table exists (see [`remove_stale`]).
    /// Call it before the process is frozen; it takes a fraction of a
    /// millisecond, but has no reason to be inside the freeze.
    pub fn prepare(name: &str, mark: u32) -> Result<Lock, NetfilterError> {
        Lock::prepare_with(name, mark, None)
    }

    /// Like [`Lock::prepare`], but every incoming packet the lock drops is
    /// first copied to the returned [`Capture`] (see its module), so that
    /// the data peers send meanwhile can be delivered to the restored
    /// connections instead of waiting for their retransmission. Without
    /// `nfnetlink_log` the lock works as [`Lock::prepare`]'s (no capture).
    pub fn prepare_capturing(name: &str, mark: u32) -> Result<(Lock, Option<Capture>), NetfilterError> {
        let cap = match Capture::open() {
            Ok(c) => Some(c),
            Err(e) => {
                tracing::warn!(table = name, error = %e, "the network lock cannot keep what it drops; peers will retransmit it");
                None
            }
        };
        let lock = Lock::prepare_with(name, mark, cap.as_ref().map(Capture::group))?;
        Ok((lock, cap))
    }

    fn prepare_with(name: &str, mark: u32, log_group: Option<u16>) -> Result<Lock, NetfilterError> {
        check_table_name(name)?;
        if mark == 0 {
            return Err(NetfilterError::InvalidMark {
                table: name.to_owned(),
                mark,
                reason: "mark 0 would exempt every unmarked packet",
            });
        }
        let mut sock = Socket::open()?;
        let mut b = sock.batch(format!("preparing the network lock in nftables table {name}"), 4096);
        nft::add_table(&mut b, name);
        nft::add_chain(&mut b, name, nft::INPUT);
        nft::add_chain(&mut b, name, nft::OUTPUT);
        nft::add_set(&mut b, name, &nft::V4);
        nft::add_set(&mut b, name, &nft::V6);
        for chain in [nft::INPUT, nft::OUTPUT] {
            nft::add_mark_rule(&mut b, name, chain, mark);
            let log = if chain.name == nft::INPUT.name { log_group } else { None };
            nft::add_conn_rule(&mut b, name, chain, &nft::V4, log);
            nft::add_conn_rule(&mut b, name, chain, &nft::V6, log);
        }
        sock.transact(b)?;
        tracing::debug!(table = name, mark, "network lock prepared");
        Ok(Lock { table: name.to_owned(), mark, sock: Mutex::new(sock), armed: true })
    }

    /// The table's name.
    pub fn name(&self) -> &str {
        &self.table
    }

    /// The mark whose packets pass.
    pub fn mark(&self) -> u32 {
        self.mark
    }

    /// Starts dropping the packets of `conns`, all in one atomic batch (one
    /// netlink round trip); returns the time the call took. May be called
    /// again to add more; connections already locked are accepted. With an
    /// empty `conns` nothing is sent. If any tuple is invalid nothing is
    /// locked.
    pub fn lock(&self, conns: &[ConnTuple]) -> Result<Duration, NetfilterError> {
        let start = Instant::now();
        let mut v4 = Vec::new();
        let mut v6 = Vec::new();
        for t in conns {
            match Key::of(t)? {
                Key::V4(k) => v4.extend_from_slice(&k),
                Key::V6(k) => v6.extend_from_slice(&k),
            }
        }
        let n4 = v4.len() / nft::V4.key_len() as usize;
        let n6 = v6.len() / nft::V6.key_len() as usize;
        let mut sock = lock_socket(&self.sock);
        let size = 256 + n4 * nft::element_size(&nft::V4) + n6 * nft::element_size(&nft::V6);
        let mut b = sock.batch(format!("locking {} connections in nftables table {}", conns.len(), self.table), size);
        if n4 > 0 {
            nft::add_elements(&mut b, &self.table, &nft::V4, &v4);
        }
        if n6 > 0 {
            nft::add_elements(&mut b, &self.table, &nft::V6, &v6);
        }
        if b.is_empty() {
            return Ok(start.elapsed());
        }
        sock.transact(b)?;
        let took = start.elapsed();
        tracing::debug!(table = %self.table, ipv4 = n4, ipv6 = n6, ?took, "connections locked");
        Ok(took)
    }

    /// Deletes the table, which lets every locked connection's packets
    /// through again; returns the time the call took. A table already gone
    /// (e.g. removed by [`remove_stale`]) is not an error. On error the
    /// table may remain: `Drop` does not retry, [`remove_stale`] removes it.
    pub fn unlock(self) -> Result<Duration, NetfilterError> {
        // The socket closes when the returned Unlocked is dropped, here.
        self.unlock_deferred().map(|(took, _)| took)
    }

    /// Like [`Lock::unlock`], but the netlink socket is closed only when the
    /// returned [`Unlocked`] is dropped: closing it can take the kernel ~10
    /// ms, which a caller with the connections' peers waiting does elsewhere
    /// (e.g. on another thread).
    pub fn unlock_deferred(mut self) -> Result<(Duration, Unlocked), NetfilterError> {
        let start = Instant::now();
        self.armed = false;
        {
            let mut sock = lock_socket(&self.sock);
            delete_table(&mut sock, &self.table)?;
        }
        let took = start.elapsed();
        tracing::debug!(table = %self.table, ?took, "network lock released");
        Ok((took, Unlocked(self)))
    }

    /// Leaves the table in place and returns its name: the connections stay
    /// locked after this `Lock` is gone (e.g. from dump until restore, in
    /// another process). Remove it later with [`remove_table`] or
    /// [`remove_stale`].
    pub fn persist(mut self) -> String {
        self.armed = false;
        std::mem::take(&mut self.table)
    }
}

/// An unlocked [`Lock`] whose netlink socket is still open; dropping it closes it.
pub struct Unlocked(#[allow(dead_code)] Lock);

impl Drop for Lock {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let sock = self.sock.get_mut().unwrap_or_else(|poisoned| poisoned.into_inner());
        if let Err(e) = delete_table(sock, &self.table) {
            tracing::warn!(table = %self.table, "dropping the network lock: {e}");
        }
    }
}

/// Deletes every `inet` table whose name starts with `prefix` (which must
/// itself start with [`TABLE_PREFIX`]), in one batch, in the calling
/// thread's network namespace; returns their names, sorted. For an agent's
/// start: the locks a previous run left behind, found by name.
pub fn remove_stale(prefix: &str) -> Result<Vec<String>, NetfilterError> {
    check_charset(prefix)?;
    if !prefix.starts_with(TABLE_PREFIX) {
        return Err(NetfilterError::InvalidName {
            name: prefix.to_owned(),
            reason: "the prefix of floe's tables must start with \"floe_\"",
        });
    }
    let mut sock = Socket::open()?;
    // A table deleted by someone else between the listing and the batch
    // fails the whole batch with ENOENT: list again.
    let mut attempts = 0;
    loop {
        let mut names: Vec<String> =
            sock.list_tables(nft::NFPROTO_INET)?.into_iter().filter(|n| n.starts_with(prefix)).collect();
        names.sort();
        if names.is_empty() {
            return Ok(names);
        }
        let mut b = sock.batch(format!("deleting {} stale nftables tables {prefix}*", names.len()), 64 * names.len());
        for name in &names {
            nft::delete_table(&mut b, name);
        }
        match sock.transact(b) {
            Err(e) if e.errno() == Some(libc::ENOENT) && attempts < 3 => attempts += 1,
            Err(e) => return Err(e),
            Ok(()) => {
                tracing::info!(tables = ?names, "removed stale network locks");
                return Ok(names);
            }
        }
    }
}

/// Deletes table `inet name` (which must start with [`TABLE_PREFIX`]) in
/// the calling thread's network namespace, e.g. the table of a
/// [`Lock::persist`]ed lock; returns whether it existed.
pub fn remove_table(name: &str) -> Result<bool, NetfilterError> {
    check_table_name(name)?;
    let existed = delete_table(&mut Socket::open()?, name)?;
    tracing::debug!(table = name, existed, "network lock removed");
    Ok(existed)
}

/// Whether table `inet name` exists in the calling thread's network
/// namespace.
pub fn table_exists(name: &str) -> Result<bool, NetfilterError> {
    check_charset(name)?;
    Socket::open()?.table_exists(nft::NFPROTO_INET, name)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn t(local: &str, remote: &str) -> ConnTuple {
        ConnTuple::new(local.parse().unwrap(), remote.parse().unwrap())
    }

    #[test]
    fn v4_key_is_remote_then_local_with_padded_ports() {
        let Key::V4(k) = Key::of(&t("127.0.0.2:8080", "127.0.0.1:40001")).unwrap() else { panic!("not v4") };
        assert_eq!(k, [127, 0, 0, 1, 0x9c, 0x41, 0, 0, 127, 0, 0, 2, 0x1f, 0x90, 0, 0]);
    }

    #[test]
    fn v6_key_layout() {
        let Key::V6(k) = Key::of(&t("[::1]:443", "[2001:db8::5]:50000")).unwrap() else { panic!("not v6") };
        assert_eq!(k.len(), 40);
        assert_eq!(&k[0..2], &[0x20, 0x01]);
        assert_eq!(k[15], 5);
        assert_eq!(&k[16..20], &[0xc3, 0x50, 0, 0]);
        assert_eq!(k[35], 1);
        assert_eq!(&k[36..40], &[1, 0xbb, 0, 0]);
    }

    #[test]
    fn mapped_addresses_are_ipv4() {
        let Key::V4(k) = Key::of(&t("[::ffff:10.0.0.1]:80", "[::ffff:10.0.0.2]:9000")).unwrap() else {
            panic!("mapped should be v4")
        };
        assert_eq!(&k[0..4], &[10, 0, 0, 2]);
        // Mixing a mapped address with a plain IPv4 one is the same family.
        assert!(matches!(Key::of(&t("10.0.0.1:80", "[::ffff:10.0.0.2]:9000")), Ok(Key::V4(_))));
    }

    #[test]
    fn bad_tuples_are_refused() {
        for (l, r) in [("10.0.0.1:80", "[::1]:9000"), ("10.0.0.1:0", "10.0.0.2:9"), ("0.0.0.0:80", "10.0.0.2:9")] {
            let e = Key::of(&t(l, r)).err().unwrap();
            assert!(matches!(e, NetfilterError::InvalidTuple { .. }), "{e}");
            assert!(e.to_string().starts_with("cannot lock connection local"), "{e}");
        }
    }

    #[test]
    fn lock_can_be_shared_across_threads() {
        fn send_sync<T: Send + Sync>() {}
        send_sync::<Lock>();
        send_sync::<NetfilterError>();
    }

    #[test]
    fn socket_debug_leaves_out_the_buffer() {
        // Opening a netlink socket needs no privilege.
        let Ok(sock) = Socket::open() else { return };
        let s = format!("{sock:?}");
        assert!(s.starts_with("Socket { fd: ") && s.len() < 200, "{s}");
    }

    #[test]
    fn names_are_checked() {
        assert!(check_table_name("floe_abc-1_2").is_ok());
        for bad in ["", "floe_", "other_x", "floe_a b", "floe_a\0", "floe_é", "Floe_x"] {
            assert!(check_table_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_table_name(&format!("floe_{}", "a".repeat(250))).is_ok());
        assert!(check_table_name(&format!("floe_{}", "a".repeat(251))).is_err());
        assert!(check_charset("other_x").is_ok());
    }
}
