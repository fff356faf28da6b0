//! A NETLINK_NETFILTER socket speaking nf_tables: atomic batches whose
//! every message is acknowledged, and table queries.

use crate::error::{Errno, NetfilterError};
use crate::msg::{self, Writer};
use crate::nft;
use crate::sys;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

/// How long to wait for an answer. The kernel handles a request inside
/// `sendto`, so answers are normally queued before it returns; the bound
/// only matters if the kernel dropped them.
const REPLY_TIMEOUT: Duration = Duration::from_secs(2);

/// Receive buffer: the kernel's dump messages are at most 32 KiB.
const RECV_BUF: usize = 64 * 1024;

/// A send buffer size the kernel grants without asking (it allows sends up
/// to the buffer size minus a small overhead); bigger batches raise it.
const DEFAULT_SNDBUF: usize = 200 * 1024;

/// `nfgenmsg.res_id` of batch delimiters: the subsystem the batch is for.
const BATCH_RES_ID: u16 = nft::NFNL_SUBSYS_NFTABLES;

/// A NETLINK_NETFILTER socket, bound to the network namespace the thread
/// that opened it was in.
pub(crate) struct Socket {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
    sndbuf: usize,
}

impl std::fmt::Debug for Socket {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Socket").field("fd", &self.fd).field("seq", &self.seq).finish_non_exhaustive()
    }
}

/// The acknowledgement in `m`, or the kernel's refusal as an error naming `op`.
pub(crate) fn checked_ack(m: &msg::Msg<'_>, op: &str) -> Result<msg::Ack, NetfilterError> {
    let ack = msg::parse_ack(m).map_err(|d| NetfilterError::protocol(op, d))?;
    if ack.errno != 0 {
        return Err(NetfilterError::Kernel { op: op.into(), errno: Errno(ack.errno), message: ack.message });
    }
    Ok(ack)
}

/// An nf_tables batch being built: `NFNL_MSG_BATCH_BEGIN`, messages that
/// each ask for an acknowledgement, `NFNL_MSG_BATCH_END`. The kernel
/// commits all of it or none.
pub(crate) struct Batch {
    w: Writer,
    /// Describes the whole batch, for errors not tied to one message.
    what: String,
    begin_seq: u32,
    /// One description per message, in sequence order after `begin_seq`.
    ops: Vec<String>,
}

impl Batch {
    /// Adds an nf_tables message (`NFT_MSG_*`) for `family`; `fill` writes
    /// its attributes. `NLM_F_REQUEST | NLM_F_ACK` are added to `flags`.
    pub(crate) fn add(&mut self, nft_msg: u16, family: u8, flags: u16, op: String, fill: impl FnOnce(&mut Writer)) {
        let seq = self.begin_seq.wrapping_add(1).wrapping_add(self.ops.len() as u32);
        let ty = (nft::NFNL_SUBSYS_NFTABLES << 8) | nft_msg;
        let start = self.w.begin_msg(ty, flags | msg::NLM_F_REQUEST | msg::NLM_F_ACK, seq, family, 0);
        fill(&mut self.w);
        self.w.end_msg(start);
        self.ops.push(op);
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.ops.is_empty()
    }
}

/// Outcome of a batch as the acknowledgements tell it.
struct BatchResult {
    /// Per message: `None` until answered, then its errno (0 = success).
    answers: Vec<Option<(i32, Option<String>)>>,
    /// An error not tied to one message (answering BATCH_BEGIN), e.g. a
    /// failed commit or a missing subsystem.
    batch_error: Option<(i32, Option<String>)>,
}

impl Socket {
    /// Opens a NETLINK_NETFILTER socket in the calling thread's network
    /// namespace.
    pub(crate) fn open() -> Result<Socket, NetfilterError> {
        let op = "opening a NETLINK_NETFILTER socket";
        let fd = sys::netlink_socket(libc::NETLINK_NETFILTER).map_err(|e| NetfilterError::os(op, &e))?;
        // Errors answer with the request's header only, and may carry the
        // kernel's explanation. Both options are optional (Linux 4.3 / 4.12).
        let _ = sys::set_int_opt(fd.as_fd(), libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        let _ = sys::set_int_opt(fd.as_fd(), libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        sys::set_recv_timeout(fd.as_fd(), REPLY_TIMEOUT).map_err(|e| NetfilterError::os(op, &e))?;
        Ok(Socket { fd, seq: 1, buf: vec![0; RECV_BUF], sndbuf: DEFAULT_SNDBUF })
    }

    fn next_seq(&mut self) -> u32 {
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1).max(1);
        seq
    }

    /// Starts a batch described by `what` ("preparing the network lock
    /// in nftables table floe_x"), sized for about `capacity` bytes.
    pub(crate) fn batch(&mut self, what: String, capacity: usize) -> Batch {
        let begin_seq = self.next_seq();
        let mut w = Writer::with_capacity(capacity + 64);
        let start =
            w.begin_msg(nft::NFNL_MSG_BATCH_BEGIN, msg::NLM_F_REQUEST, begin_seq, libc::AF_UNSPEC as u8, BATCH_RES_ID);
        w.end_msg(start);
        Batch { w, what, begin_seq, ops: Vec::new() }
    }

    /// Sends one datagram, raising the send buffer first if it is too small.
    fn send(&mut self, buf: &[u8], op: &str) -> Result<(), NetfilterError> {
        if buf.len() + 4096 > self.sndbuf {
            let want = (buf.len() + 64 * 1024).min(libc::c_int::MAX as usize) as libc::c_int;
            // SO_SNDBUFFORCE passes wmem_max (needs CAP_NET_ADMIN, which
            // any change to nf_tables needs too); SO_SNDBUF is capped by it.
            sys::set_int_opt(self.fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, want)
                .or_else(|_| sys::set_int_opt(self.fd.as_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, want))
                .map_err(|e| NetfilterError::os(format!("{op}: raising the netlink send buffer"), &e))?;
            self.sndbuf = want as usize;
        }
        let sent = sys::send_to_kernel(self.fd.as_fd(), buf).map_err(|e| NetfilterError::os(op, &e))?;
        if sent != buf.len() {
            return Err(NetfilterError::protocol(op, format!("the kernel took {sent} of {} bytes", buf.len())));
        }
        Ok(())
    }

    /// Receives one datagram from the kernel into `self.buf`; returns its length.
    fn recv(&mut self, op: &str) -> Result<usize, NetfilterError> {
        loop {
            let r = match sys::recv(self.fd.as_fd(), &mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(NetfilterError::protocol(
                        op,
                        format!("no answer from the kernel within {} s", REPLY_TIMEOUT.as_secs()),
                    ))
                }
                Err(e) => return Err(NetfilterError::os(op, &e)),
            };
            if r.sender != 0 {
                // Not from the kernel: some other process wrote to our port.
                tracing::debug!(sender = r.sender, "ignoring a netlink datagram not sent by the kernel");
                continue;
            }
            if r.truncated {
                return Err(NetfilterError::protocol(op, "the kernel's answer did not fit the receive buffer"));
            }
            return Ok(r.len);
        }
    }

    /// Sends `batch` in one datagram and checks the answer to every
    /// message. On error nothing of the batch was applied.
    pub(crate) fn transact(&mut self, mut batch: Batch) -> Result<(), NetfilterError> {
        let end_seq = batch.begin_seq.wrapping_add(1).wrapping_add(batch.ops.len() as u32);
        let start = batch.w.begin_msg(
            nft::NFNL_MSG_BATCH_END,
            msg::NLM_F_REQUEST,
            end_seq,
            libc::AF_UNSPEC as u8,
            BATCH_RES_ID,
        );
        batch.w.end_msg(start);
        self.seq = end_seq.wrapping_add(1).max(1);
        let what = batch.what;
        let ops = batch.ops;
        let buf = batch.w.finish().ok_or_else(|| {
            NetfilterError::protocol(what.as_str(), "a netlink attribute would exceed its 64 KiB length limit")
        })?;
        self.send(&buf, &what)?;

        let mut result = BatchResult { answers: vec![None; ops.len()], batch_error: None };
        while result.batch_error.is_none() && result.answers.iter().any(Option::is_none) {
            let n = self.recv(&what)?;
            for m in msg::messages(&self.buf[..n]) {
                let m = m.map_err(|d| NetfilterError::protocol(what.as_str(), d))?;
                if m.ty != msg::NLMSG_ERROR {
                    continue;
                }
                let ack = msg::parse_ack(&m).map_err(|d| NetfilterError::protocol(what.as_str(), d))?;
                let index = ack.seq.wrapping_sub(batch.begin_seq).wrapping_sub(1) as usize;
                if ack.seq == batch.begin_seq {
                    if ack.errno != 0 {
                        result.batch_error = Some((ack.errno, ack.message));
                    }
                } else if let Some(slot) = result.answers.get_mut(index) {
                    *slot = Some((ack.errno, ack.message));
                }
                // Anything else answers an earlier request; ignore it.
            }
        }

        if let Some((errno, message)) = result.batch_error {
            return Err(NetfilterError::Kernel { op: what, errno: Errno(errno), message });
        }
        // The first refused message is the cause; later ones may fail only
        // because of it.
        for (op, answer) in ops.into_iter().zip(result.answers) {
            match answer {
                Some((0, _)) => {}
                Some((errno, message)) => return Err(NetfilterError::Kernel { op, errno: Errno(errno), message }),
                None => {
                    return Err(NetfilterError::protocol(
                        op,
                        "the kernel ended the batch without answering this message",
                    ))
                }
            }
        }
        Ok(())
    }

    /// Names of all tables of `family` (an `NFT_MSG_GETTABLE` dump).
    pub(crate) fn list_tables(&mut self, family: u8) -> Result<Vec<String>, NetfilterError> {
        let op = "listing nftables tables";
        // A dump interrupted by a concurrent change is flagged; retry it.
        for _ in 0..8 {
            let seq = self.next_seq();
            let mut w = Writer::default();
            let start = w.begin_msg(
                (nft::NFNL_SUBSYS_NFTABLES << 8) | nft::NFT_MSG_GETTABLE,
                msg::NLM_F_REQUEST | msg::NLM_F_DUMP,
                seq,
                family,
                0,
            );
            w.end_msg(start);
            let req = w.finish().ok_or_else(|| NetfilterError::protocol(op, "request too long"))?;
            self.send(&req, op)?;

            let mut names = Vec::new();
            let mut interrupted = false;
            'dump: loop {
                let n = self.recv(op)?;
                for m in msg::messages(&self.buf[..n]) {
                    let m = m.map_err(|d| NetfilterError::protocol(op, d))?;
                    if m.seq != seq {
                        continue;
                    }
                    interrupted |= m.flags & msg::NLM_F_DUMP_INTR != 0;
                    match m.ty {
                        msg::NLMSG_DONE => {
                            // The payload is the dump's own status.
                            let status = m.payload.get(..4).map_or(0, |b| i32::from_ne_bytes([b[0], b[1], b[2], b[3]]));
                            if status < 0 {
                                return Err(NetfilterError::Kernel {
                                    op: op.into(),
                                    errno: Errno(-status),
                                    message: None,
                                });
                            }
                            break 'dump;
                        }
                        msg::NLMSG_ERROR => {
                            checked_ack(&m, op)?;
                            break 'dump;
                        }
                        t if t == (nft::NFNL_SUBSYS_NFTABLES << 8) | nft::NFT_MSG_NEWTABLE => {
                            let attrs = msg::nf_attrs(&m).map_err(|d| NetfilterError::protocol(op, d))?;
                            for a in attrs {
                                let (ty, data) = a.map_err(|d| NetfilterError::protocol(op, d))?;
                                if ty == nft::NFTA_TABLE_NAME {
                                    names.push(msg::attr_str(data));
                                }
                            }
                        }
                        _ => {}
                    }
                }
            }
            if !interrupted {
                return Ok(names);
            }
        }
        Err(NetfilterError::protocol(op, "the table list kept changing while it was read"))
    }

    /// Whether table `name` of `family` exists (`NFT_MSG_GETTABLE`).
    pub(crate) fn table_exists(&mut self, family: u8, name: &str) -> Result<bool, NetfilterError> {
        let op = format!("looking up nftables table {name}");
        let seq = self.next_seq();
        let mut w = Writer::default();
        let start = w.begin_msg(
            (nft::NFNL_SUBSYS_NFTABLES << 8) | nft::NFT_MSG_GETTABLE,
            msg::NLM_F_REQUEST | msg::NLM_F_ACK,
            seq,
            family,
            0,
        );
        w.put_str(nft::NFTA_TABLE_NAME, name);
        w.end_msg(start);
        let req = w.finish().ok_or_else(|| NetfilterError::protocol(op.as_str(), "request too long"))?;
        self.send(&req, &op)?;
        let mut found = false;
        loop {
            let n = self.recv(&op)?;
            for m in msg::messages(&self.buf[..n]) {
                let m = m.map_err(|d| NetfilterError::protocol(op.as_str(), d))?;
                if m.seq != seq {
                    continue;
                }
                if m.ty == (nft::NFNL_SUBSYS_NFTABLES << 8) | nft::NFT_MSG_NEWTABLE {
                    found = true;
                } else if m.ty == msg::NLMSG_ERROR {
                    let ack = msg::parse_ack(&m).map_err(|d| NetfilterError::protocol(op.as_str(), d))?;
                    return match ack.errno {
                        0 => Ok(found),
                        libc::ENOENT => Ok(false),
                        errno => Err(NetfilterError::Kernel { op, errno: Errno(errno), message: ack.message }),
                    };
                }
            }
        }
    }
}
