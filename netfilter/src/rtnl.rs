//! Service addresses over rtnetlink (`NETLINK_ROUTE`): find, add and delete
//! an interface address without running `ip` (each run of it costs
//! milliseconds, and a migration moves its address inside the downtime).
//!
//! Every function opens its socket in the calling thread's network
//! namespace and needs `CAP_NET_ADMIN` there to change anything.

use crate::error::NetfilterError;
use crate::msg::{self, Writer};
use crate::netlink::checked_ack;
use crate::sys;
use std::net::IpAddr;
use std::os::fd::{AsFd, OwnedFd};
use std::time::Duration;

const IFA_F_NODAD: u8 = 0x02;
const RTA_DST: u16 = 1;
const RTA_OIF: u16 = 4;
/// `sizeof(struct ifaddrmsg)`: family, prefix length, flags, scope, index.
const IFADDRMSG_LEN: usize = 8;
/// `sizeof(struct rtmsg)`.
const RTMSG_LEN: usize = 12;

const _: () = {
    assert!(std::mem::size_of::<libc::ifaddrmsg>() == IFADDRMSG_LEN);
    assert!(RTA_DST == libc::RTA_DST);
    assert!(RTA_OIF == libc::RTA_OIF);
    assert!(IFA_F_NODAD as u32 == libc::IFA_F_NODAD);
};

/// An address configured on an interface.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IfAddr {
    pub ifindex: u32,
    /// The interface's name ("" if it vanished meanwhile).
    pub ifname: String,
    pub prefix_len: u8,
}

struct Route {
    fd: OwnedFd,
    seq: u32,
    buf: Vec<u8>,
}

fn family(ip: IpAddr) -> u8 {
    if ip.is_ipv4() {
        libc::AF_INET as u8
    } else {
        libc::AF_INET6 as u8
    }
}

fn octets(ip: IpAddr) -> Vec<u8> {
    match ip {
        IpAddr::V4(v4) => v4.octets().to_vec(),
        IpAddr::V6(v6) => v6.octets().to_vec(),
    }
}

fn ifaddrmsg(ip: IpAddr, prefix_len: u8, flags: u8, ifindex: u32) -> Vec<u8> {
    let mut h = vec![family(ip), prefix_len, flags, libc::RT_SCOPE_UNIVERSE];
    h.extend_from_slice(&ifindex.to_ne_bytes());
    h
}

impl Route {
    fn open(op: &str) -> Result<Route, NetfilterError> {
        let fd = sys::netlink_socket(libc::NETLINK_ROUTE).map_err(|e| NetfilterError::os(op, &e))?;
        let _ = sys::set_int_opt(fd.as_fd(), libc::SOL_NETLINK, libc::NETLINK_CAP_ACK, 1);
        let _ = sys::set_int_opt(fd.as_fd(), libc::SOL_NETLINK, libc::NETLINK_EXT_ACK, 1);
        sys::set_recv_timeout(fd.as_fd(), Duration::from_secs(2)).map_err(|e| NetfilterError::os(op, &e))?;
        Ok(Route { fd, seq: 1, buf: vec![0; 64 * 1024] })
    }

    /// Sends one request and hands every answer message with its sequence
    /// number to `each` until the acknowledgement (or, for a dump,
    /// `NLMSG_DONE`); a kernel error ends it.
    fn request(
        &mut self,
        op: &str,
        ty: u16,
        flags: u16,
        fixed: &[u8],
        attrs: &[(u16, Vec<u8>)],
        mut each: impl FnMut(&msg::Msg<'_>),
    ) -> Result<(), NetfilterError> {
        self.seq = self.seq.wrapping_add(1);
        let seq = self.seq;
        let mut w = Writer::default();
        let start = w.begin_raw_msg(ty, flags | msg::NLM_F_REQUEST | msg::NLM_F_ACK, seq, fixed);
        for (t, v) in attrs {
            w.put(*t, v);
        }
        w.end_msg(start);
        let req = w.finish().ok_or_else(|| NetfilterError::protocol(op, "request too long"))?;
        sys::send_to_kernel(self.fd.as_fd(), &req).map_err(|e| NetfilterError::os(op, &e))?;
        loop {
            let r = match sys::recv(self.fd.as_fd(), &mut self.buf) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(NetfilterError::protocol(op, "no answer from the kernel within 2 s"))
                }
                Err(e) => return Err(NetfilterError::os(op, &e)),
            };
            if r.sender != 0 || r.truncated {
                continue;
            }
            for m in msg::messages(&self.buf[..r.len]) {
                let m = m.map_err(|d| NetfilterError::protocol(op, d))?;
                if m.seq != seq {
                    continue;
                }
                match m.ty {
                    msg::NLMSG_DONE => return Ok(()),
                    msg::NLMSG_ERROR => {
                        checked_ack(&m, op)?;
                        return Ok(());
                    }
                    _ => each(&m),
                }
            }
        }
    }
}

/// The interface holding `ip`, if any.
pub fn find_address(ip: IpAddr) -> Result<Option<IfAddr>, NetfilterError> {
    let op = format!("looking for address {ip}");
    let mut route = Route::open(&op)?;
    let want = octets(ip);
    let mut found = None;
    route.request(&op, libc::RTM_GETADDR, msg::NLM_F_DUMP, &ifaddrmsg(ip, 0, 0, 0), &[], |m| {
        if m.ty != libc::RTM_NEWADDR || found.is_some() || m.payload.len() < IFADDRMSG_LEN {
            return;
        }
        let p = m.payload;
        if p[0] != family(ip) {
            return;
        }
        let index = u32::from_ne_bytes([p[4], p[5], p[6], p[7]]);
        // IFA_LOCAL is the address itself (IFA_ADDRESS the peer's on a
        // point-to-point link); IPv6 has only IFA_ADDRESS.
        let mine = msg::attrs(&p[IFADDRMSG_LEN..])
            .flatten()
            .any(|(t, v)| (t == libc::IFA_LOCAL || t == libc::IFA_ADDRESS) && v == want.as_slice());
        if mine {
            found = Some(IfAddr { ifindex: index, ifname: String::new(), prefix_len: p[1] });
        }
    })?;
    Ok(found.map(|a| IfAddr { ifname: sys::if_name(a.ifindex).unwrap_or_default(), ..a }))
}

/// The interface this host sends to `ip` through (its route's output
/// interface).
pub fn route_interface(ip: IpAddr) -> Result<u32, NetfilterError> {
    let op = format!("looking up the route to {ip}");
    let mut route = Route::open(&op)?;
    let bits = if ip.is_ipv4() { 32 } else { 128 };
    let mut rtmsg = vec![0u8; RTMSG_LEN];
    rtmsg[0] = family(ip);
    rtmsg[1] = bits;
    let mut oif = None;
    route.request(&op, libc::RTM_GETROUTE, 0, &rtmsg, &[(RTA_DST, octets(ip))], |m| {
        if m.ty != libc::RTM_NEWROUTE || m.payload.len() < RTMSG_LEN {
            return;
        }
        for (t, v) in msg::attrs(&m.payload[RTMSG_LEN..]).flatten() {
            if t == RTA_OIF && v.len() == 4 {
                oif = Some(u32::from_ne_bytes([v[0], v[1], v[2], v[3]]));
            }
        }
    })?;
    oif.ok_or_else(|| NetfilterError::protocol(op, "the route has no output interface"))
}

/// Adds `ip/prefix_len` on interface `ifindex` (IPv6 without duplicate
/// address detection when `nodad`). An address already there is an error
/// (`EEXIST`).
pub fn add_address(ip: IpAddr, prefix_len: u8, ifindex: u32, nodad: bool) -> Result<(), NetfilterError> {
    let op = format!("adding address {ip}/{prefix_len} to interface {ifindex}");
    let mut route = Route::open(&op)?;
    let flags = if nodad && ip.is_ipv6() { IFA_F_NODAD } else { 0 };
    let mut attrs = vec![(libc::IFA_ADDRESS, octets(ip))];
    if ip.is_ipv4() {
        attrs.push((libc::IFA_LOCAL, octets(ip)));
    }
    route.request(
        &op,
        libc::RTM_NEWADDR,
        msg::NLM_F_CREATE | msg::NLM_F_EXCL,
        &ifaddrmsg(ip, prefix_len, flags, ifindex),
        &attrs,
        |_| {},
    )
}

/// Deletes `ip/prefix_len` from interface `ifindex`.
pub fn delete_address(ip: IpAddr, prefix_len: u8, ifindex: u32) -> Result<(), NetfilterError> {
    let op = format!("deleting address {ip}/{prefix_len} from interface {ifindex}");
    let mut route = Route::open(&op)?;
    let mut attrs = vec![(libc::IFA_ADDRESS, octets(ip))];
    if ip.is_ipv4() {
        attrs.push((libc::IFA_LOCAL, octets(ip)));
    }
    route.request(&op, libc::RTM_DELADDR, 0, &ifaddrmsg(ip, prefix_len, 0, ifindex), &attrs, |_| {})
}

/// The index of interface `name`.
pub fn interface_index(name: &str) -> Result<u32, NetfilterError> {
    sys::if_index(name).map_err(|e| NetfilterError::os(format!("looking up interface {name}"), &e))
}

/// The name of interface `index`.
pub fn interface_name(index: u32) -> Result<String, NetfilterError> {
    sys::if_name(index).map_err(|e| NetfilterError::os(format!("looking up interface {index}"), &e))
}
