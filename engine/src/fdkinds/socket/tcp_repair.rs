//! Established TCP connections with TCP_REPAIR (`--tcp-established`).
//!
//! Dump (the process is frozen and its connections are locked by the
//! caller, so no segment moves while they are read): repair mode on, then
//! both queues' sequence numbers and contents (MSG_PEEK under
//! TCP_REPAIR_QUEUE), how much of the send queue was never sent
//! (SIOCOUTQNSD), MSS, window scaling, SACK and timestamps (TCP_INFO),
//! the timestamp clock and the repair window. The socket is left in repair
//! mode: when the dumped process dies it closes without a FIN or RST, and
//! when it is resumed instead, [`leave_repair`] takes it out silently.
//!
//! Restore (before the restored process runs): a socket in repair mode gets
//! both queues' starting sequence numbers, is bound and "connected" (no
//! SYN in repair mode), gets its options, timestamp clock and queues back,
//! then its window; repair mode ends with a window probe, which has the
//! peer acknowledge at once. The part of the send queue that was never sent
//! is then sent normally, so it goes out now instead of after a
//! retransmission timeout.
use crate::sys::fd_socket;
use floe_proto::image as pb;
use std::os::fd::OwnedFd;

const TCP_REPAIR: i32 = 19;
const TCP_REPAIR_QUEUE: i32 = 20;
const TCP_QUEUE_SEQ: i32 = 21;
const TCP_REPAIR_OPTIONS: i32 = 22;
const TCP_TIMESTAMP: i32 = 24;
const TCP_REPAIR_WINDOW: i32 = 29;
const TCP_RECV_QUEUE: i32 = 1;
const TCP_SEND_QUEUE: i32 = 2;
/// Values of TCP_REPAIR: on, off with a window probe, off without one.
const REPAIR_ON: i32 = 1;
const REPAIR_OFF: i32 = 0;
const REPAIR_OFF_NO_WP: i32 = -1;
const TCPOPT_MAXSEG: u32 = 2;
const TCPOPT_WINDOW: u32 = 3;
const TCPOPT_SACK_PERM: u32 = 4;
const TCPOPT_TIMESTAMP: u32 = 8;
const TCPI_OPT_TIMESTAMPS: u8 = 1;
const TCPI_OPT_SACK: u8 = 2;
const TCPI_OPT_WSCALE: u8 = 4;
const SIOCOUTQNSD: libc::c_ulong = 0x894B;
/// struct tcp_repair_window: snd_wl1, snd_wnd, max_window, rcv_wnd, rcv_wup.
const REPAIR_WINDOW_LEN: usize = 20;
/// Half-closed states (include/net/tcp_states.h).
const FIN_WAIT1: u8 = 4;
const FIN_WAIT2: u8 = 5;
const CLOSE_WAIT: u8 = 8;
const LAST_ACK: u8 = 9;
const CLOSING: u8 = 11;

/// This end has sent its FIN (it takes a sequence number of the send side).
fn fin_sent(state: u8) -> bool {
    matches!(state, FIN_WAIT1 | FIN_WAIT2 | LAST_ACK | CLOSING)
}

/// The peer's FIN has arrived (it takes a sequence number of the receive side).
fn fin_received(state: u8) -> bool {
    matches!(state, CLOSE_WAIT | LAST_ACK | CLOSING)
}

/// This end's FIN is still unacknowledged: counted in the send queue's length.
fn fin_unacked(state: u8) -> bool {
    matches!(state, FIN_WAIT1 | LAST_ACK | CLOSING)
}

fn e(what: &'static str) -> impl Fn(std::io::Error) -> String {
    move |err| format!("TCP_REPAIR: cannot {what} ({err})")
}

fn u32_at(b: &[u8], i: usize) -> u32 {
    b.get(i * 4..i * 4 + 4).map(|s| u32::from_ne_bytes([s[0], s[1], s[2], s[3]])).unwrap_or(0)
}

/// Reads one queue's data without consuming it (repair mode, queue selected).
fn peek_queue(sock: &OwnedFd, len: usize) -> Result<Vec<u8>, String> {
    let mut buf = vec![0u8; len];
    if len == 0 {
        return Ok(buf);
    }
    let got = fd_socket::peek(sock, &mut buf, 0).map_err(e("read a queue"))?;
    if got.len != len {
        return Err(format!("TCP_REPAIR: queue holds {} bytes, {len} expected", got.len));
    }
    Ok(buf)
}

/// Puts `sock` (in TCP state `state`: established or half closed) in
/// repair mode and reads the connection's state. Queue contents go to
/// `blobs`. The sequence numbers include a FIN sent or received, as the
/// kernel counts them.
pub fn dump(sock: &OwnedFd, state: u8, blobs: &mut Vec<Vec<u8>>) -> Result<pb::TcpRepair, String> {
    fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_REPAIR, REPAIR_ON)
        .map_err(e("enter repair mode (needs CAP_NET_ADMIN)"))?;
    let r = read_state(sock, state, blobs);
    if r.is_err() {
        leave_repair(sock);
    }
    r
}

fn read_state(sock: &OwnedFd, state: u8, blobs: &mut Vec<Vec<u8>>) -> Result<pb::TcpRepair, String> {
    let mut t = pb::TcpRepair { send_queue_blob: -1, recv_queue_blob: -1, ..Default::default() };
    // An unacknowledged FIN counts one in the queue's length, and is no data.
    let outq = fd_socket::ioctl_int(sock, libc::TIOCOUTQ).map_err(e("measure the send queue"))?.max(0) as usize;
    let outq = outq.saturating_sub(usize::from(fin_unacked(state)));
    let unsent = fd_socket::ioctl_int(sock, SIOCOUTQNSD).map_err(e("measure the unsent data"))?.max(0) as usize;
    let inq = fd_socket::ioctl_int(sock, libc::FIONREAD).map_err(e("measure the receive queue"))?.max(0) as usize;
    for (queue, seq) in [(TCP_SEND_QUEUE, &mut t.snd_seq), (TCP_RECV_QUEUE, &mut t.rcv_seq)] {
        fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, queue).map_err(e("select a queue"))?;
        *seq = fd_socket::getsockopt_int(sock, libc::IPPROTO_TCP, TCP_QUEUE_SEQ).map_err(e("read a sequence number"))?
            as u32;
    }
    fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_SEND_QUEUE)
        .map_err(e("select a queue"))?;
    let sendq = peek_queue(sock, outq)?;
    fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, TCP_RECV_QUEUE)
        .map_err(e("select a queue"))?;
    let recvq = peek_queue(sock, inq)?;
    t.send_queue_len = outq as u32;
    t.recv_queue_len = inq as u32;
    t.unsent = unsent.min(outq) as u32;
    if !sendq.is_empty() {
        t.send_queue_blob = blobs.len() as i32;
        blobs.push(sendq);
    }
    if !recvq.is_empty() {
        t.recv_queue_blob = blobs.len() as i32;
        blobs.push(recvq);
    }
    let info = fd_socket::getsockopt(sock, libc::IPPROTO_TCP, libc::TCP_INFO, 8).map_err(e("read TCP_INFO"))?;
    let (opts, ws) = (info.get(5).copied().unwrap_or(0), info.get(6).copied().unwrap_or(0));
    t.timestamps = opts & TCPI_OPT_TIMESTAMPS != 0;
    t.sack = opts & TCPI_OPT_SACK != 0;
    t.wscale = opts & TCPI_OPT_WSCALE != 0;
    t.snd_wscale = (ws & 0x0f) as u32;
    t.rcv_wscale = (ws >> 4) as u32;
    t.mss = fd_socket::getsockopt_int(sock, libc::IPPROTO_TCP, libc::TCP_MAXSEG).map_err(e("read the MSS"))? as u32;
    t.timestamp =
        fd_socket::getsockopt_int(sock, libc::IPPROTO_TCP, TCP_TIMESTAMP).map_err(e("read the timestamp"))? as u32;
    let w = fd_socket::getsockopt(sock, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, REPAIR_WINDOW_LEN)
        .map_err(e("read the window"))?;
    if w.len() != REPAIR_WINDOW_LEN {
        return Err(format!("TCP_REPAIR: the window is {} bytes, {REPAIR_WINDOW_LEN} expected", w.len()));
    }
    (t.snd_wl1, t.snd_wnd, t.max_window, t.rcv_wnd, t.rcv_wup) =
        (u32_at(&w, 0), u32_at(&w, 1), u32_at(&w, 2), u32_at(&w, 3), u32_at(&w, 4));
    Ok(t)
}

/// Takes a dumped socket out of repair mode without sending anything (the
/// dump failed, or the process keeps running).
pub fn leave_repair(sock: &OwnedFd) {
    if let Err(err) = fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_REPAIR, REPAIR_OFF_NO_WP) {
        tracing::warn!(error = %err, "cannot take a socket out of TCP repair mode");
    }
}

/// Rebuilds the connection on `sock` (a fresh TCP socket, options applied,
/// not bound): `bind`/`connect` are the raw local and remote addresses. The
/// socket stays in repair mode (silent, and closing it sends nothing);
/// returns the never-sent tail of the send queue for [`release`].
///
/// A half-closed connection (`state`) is rebuilt as established, then
/// given its FINs the way they happened: this end's by `shutdown(SHUT_WR)`
/// (in repair mode nothing is sent; the FIN counts as sent), the peer's by
/// delivering it a FIN segment from the peer's address through a raw socket
/// carrying floe's lock mark (`ends`: this end and the peer, as packets show
/// them). Its never-sent data is then part of the repaired queue (it must
/// precede the FIN), sent again only on retransmission.
#[allow(clippy::too_many_arguments)]
pub fn restore(
    sock: &OwnedFd,
    t: &pb::TcpRepair,
    state: u8,
    ends: (std::net::SocketAddr, std::net::SocketAddr),
    local: &[u8],
    remote: &[u8],
    sendq: &[u8],
    recvq: &[u8],
) -> Result<Vec<u8>, String> {
    if sendq.len() != t.send_queue_len as usize || recvq.len() != t.recv_queue_len as usize {
        return Err("TCP_REPAIR: queue data in the image does not match its length".into());
    }
    let (fin_out, fin_in) = (fin_sent(state), fin_received(state));
    let unsent = if fin_out { 0 } else { (t.unsent as usize).min(sendq.len()) };
    // Where the data ends, without the FINs (they are added back below).
    let snd_end = t.snd_seq.wrapping_sub(u32::from(fin_out));
    let rcv_end = t.rcv_seq.wrapping_sub(u32::from(fin_in));
    let (sent, later) = sendq.split_at(sendq.len() - unsent);
    // Repair mode also lets the socket bind its port next to the restored
    // listener it came from (the kernel forces address reuse; a later
    // SO_REUSEADDR would undo that).
    fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_REPAIR, REPAIR_ON)
        .map_err(e("enter repair mode (needs CAP_NET_ADMIN)"))?;
    // The queues start where their restored contents begin; the unsent tail
    // is not part of the send queue yet.
    let snd_start = snd_end.wrapping_sub(sendq.len() as u32);
    let starts = [(TCP_SEND_QUEUE, snd_start), (TCP_RECV_QUEUE, rcv_end.wrapping_sub(recvq.len() as u32))];
    for (queue, seq) in starts {
        fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, queue).map_err(e("select a queue"))?;
        fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_QUEUE_SEQ, seq as i32)
            .map_err(e("set a sequence number"))?;
    }
    fd_socket::bind(sock, local).map_err(e("bind the local address (is it configured on this host?)"))?;
    fd_socket::connect(sock, remote).map_err(e("connect in repair mode"))?;
    let mut opts: Vec<(u32, u32)> = vec![(TCPOPT_MAXSEG, t.mss)];
    if t.wscale {
        opts.push((TCPOPT_WINDOW, t.snd_wscale | (t.rcv_wscale << 16)));
    }
    if t.sack {
        opts.push((TCPOPT_SACK_PERM, 0));
    }
    if t.timestamps {
        opts.push((TCPOPT_TIMESTAMP, 0));
    }
    let raw: Vec<u8> = opts.iter().flat_map(|(c, v)| c.to_ne_bytes().into_iter().chain(v.to_ne_bytes())).collect();
    fd_socket::setsockopt(sock, libc::IPPROTO_TCP, TCP_REPAIR_OPTIONS, &raw).map_err(e("set the TCP options"))?;
    if t.timestamps {
        fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_TIMESTAMP, t.timestamp as i32)
            .map_err(e("set the timestamp"))?;
    }
    for (queue, data) in [(TCP_RECV_QUEUE, recvq), (TCP_SEND_QUEUE, sent)] {
        if data.is_empty() {
            continue;
        }
        fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_REPAIR_QUEUE, queue).map_err(e("select a queue"))?;
        send_all(sock, data).map_err(e("refill a queue"))?;
    }
    // The FINs, in the order they came: CLOSING sent its own first.
    let send_fin =
        || fd_socket::shutdown(sock, libc::SHUT_WR).map_err(e("send this end's FIN (shutdown in repair mode)"));
    if state == CLOSING {
        send_fin()?;
    }
    if fin_in {
        deliver_fin(sock, t, ends, rcv_end, snd_start, if state == CLOSING { CLOSING } else { CLOSE_WAIT })?;
    }
    if fin_out && state != CLOSING {
        send_fin()?;
    }
    let mut w = Vec::with_capacity(REPAIR_WINDOW_LEN);
    for v in [t.snd_wl1, t.snd_wnd, t.max_window, t.rcv_wnd, t.rcv_wup] {
        w.extend_from_slice(&v.to_ne_bytes());
    }
    fd_socket::setsockopt(sock, libc::IPPROTO_TCP, TCP_REPAIR_WINDOW, &w).map_err(e("set the window"))?;
    Ok(later.to_vec())
}

/// Delivers to `sock` (repair mode, queues restored) the peer's FIN: a
/// segment from `ends.1` to `ends.0` with sequence number `seq` (where the
/// peer's data ends), acknowledging `ack`, with a timestamp option when the
/// connection uses timestamps; then waits for the socket to reach `want`.
fn deliver_fin(
    sock: &OwnedFd,
    t: &pb::TcpRepair,
    ends: (std::net::SocketAddr, std::net::SocketAddr),
    seq: u32,
    ack: u32,
    want: u8,
) -> Result<(), String> {
    use std::net::IpAddr;
    let wire = floe_netfilter::ConnTuple::new(ends.0, ends.1).on_the_wire();
    let (local, peer) = (wire.local, wire.remote);
    let mut tcp = Vec::with_capacity(32);
    tcp.extend_from_slice(&peer.port().to_be_bytes());
    tcp.extend_from_slice(&local.port().to_be_bytes());
    tcp.extend_from_slice(&seq.to_be_bytes());
    tcp.extend_from_slice(&ack.to_be_bytes());
    let doff: u8 = if t.timestamps { 8 } else { 5 };
    tcp.extend_from_slice(&[doff << 4, 0x11, 0xff, 0xff, 0, 0, 0, 0]); // FIN|ACK, window, checksum, urgent
    if t.timestamps {
        // NOP, NOP, TS: a value no later than the peer's own (no PAWS drop).
        tcp.extend_from_slice(&[1, 1, 8, 10, 0, 0, 0, 1, 0, 0, 0, 0]);
    }
    let mut header = match (peer.ip(), local.ip()) {
        (IpAddr::V4(s), IpAddr::V4(d)) => {
            let mut h = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, libc::IPPROTO_TCP as u8, 0, 0];
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        (IpAddr::V6(s), IpAddr::V6(d)) => {
            let mut h = vec![0x60, 0, 0, 0, 0, 0, libc::IPPROTO_TCP as u8, 64];
            h.extend_from_slice(&s.octets());
            h.extend_from_slice(&d.octets());
            h
        }
        _ => return Err("TCP_REPAIR: the connection's ends are of different IP versions".into()),
    };
    // Lengths (and checksums, in reinject) are filled in now.
    let total = header.len() + tcp.len();
    if header.len() == 20 {
        header[2..4].copy_from_slice(&(total as u16).to_be_bytes());
    } else {
        header[4..6].copy_from_slice(&(tcp.len() as u16).to_be_bytes());
    }
    header.extend_from_slice(&tcp);
    let seg = floe_netfilter::Segment::parse(&header)
        .ok_or_else(|| "TCP_REPAIR: cannot build the peer's FIN segment".to_string())?;
    floe_netfilter::reinject(&[seg], crate::dump::NET_LOCK_MARK)
        .map_err(|err| format!("TCP_REPAIR: cannot deliver the peer's FIN ({err})"))?;
    for _ in 0..200 {
        if fd_socket::tcp_state(sock).is_ok_and(|s| s.state == want) {
            return Ok(());
        }
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    let now = fd_socket::tcp_state(sock).map(|s| s.state).unwrap_or(0);
    Err(format!("TCP_REPAIR: the peer's FIN was not taken (state {now}, {want} expected)"))
}

/// Ends the restore of a connection [`restore`] left in repair mode: repair
/// off with a window probe (the peer answers at once, and retransmits what
/// it sent meanwhile), then the data that was never sent goes out normally.
///
/// The send buffer is raised for as long as that data is queued: the
/// restored queue can take more room than it did in the original socket
/// (its segments are cut differently), and a peer that is not reading
/// frees none. If it still cannot be queued, the connection is shut down:
/// the process must never go on with a hole in what it sent.
pub fn release(sock: &OwnedFd, unsent: &[u8]) -> Result<(), String> {
    fd_socket::setsockopt_int(sock, libc::IPPROTO_TCP, TCP_REPAIR, REPAIR_OFF).map_err(e("leave repair mode"))?;
    if unsent.is_empty() {
        return Ok(());
    }
    let before = fd_socket::getsockopt_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUF).unwrap_or(0);
    // SO_SNDBUF reads back twice what was set (room for the kernel's bookkeeping).
    let room = (before as i64 + 2 * unsent.len() as i64 + (64 << 10)).min(i32::MAX as i64) as i32;
    let raised = fd_socket::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, room / 2).is_ok();
    let sent = send_all(sock, unsent);
    if raised && before > 0 {
        let _ = fd_socket::setsockopt_int(sock, libc::SOL_SOCKET, libc::SO_SNDBUFFORCE, before / 2);
    }
    if let Err(err) = sent {
        let _ = fd_socket::shutdown(sock, libc::SHUT_RDWR);
        return Err(format!(
            "TCP_REPAIR: cannot queue the {} bytes that were never sent ({err}); the connection was shut down",
            unsent.len()
        ));
    }
    Ok(())
}

/// send() until all of `data` is queued (the socket is non-blocking; the
/// queue held it before, so it fits).
fn send_all(sock: &OwnedFd, mut data: &[u8]) -> std::io::Result<()> {
    let mut spins = 0;
    while !data.is_empty() {
        match fd_socket::send(sock, data, None) {
            Ok(n) => data = &data[n..],
            Err(err) if err.raw_os_error() == Some(libc::EAGAIN) && spins < 1000 => {
                spins += 1;
                std::thread::sleep(std::time::Duration::from_millis(1));
            }
            Err(err) => return Err(err),
        }
    }
    Ok(())
}
