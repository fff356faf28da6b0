//! Moving a service address between hosts (`floe migrate --move-address`):
//! removed on the source after the freeze, added on the target before the
//! connections are restored, and announced there. The address itself moves
//! over rtnetlink (`floe_netfilter::rtnl`: a fraction of a millisecond,
//! where each `ip` run costs several inside the downtime); the announcement
//! is `arping`'s, in the background.
use floe_netfilter::rtnl;
use std::net::IpAddr;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("cannot run the address hook")]
    Hook(#[source] std::io::Error),
    #[error("{0:?} is not an address with a prefix length (IP/PREFIX)")]
    Bad(String),
    #[error("{what} {cidr}")]
    Netlink {
        what: &'static str,
        cidr: String,
        #[source]
        source: floe_netfilter::NetfilterError,
    },
    #[error("(address hook {hook}) {verb} {cidr} failed: {stderr}")]
    HookFailed { hook: String, verb: &'static str, cidr: String, stderr: String },
    #[error("{0} is not configured on this host; pass an address the process's host holds")]
    NotHere(String),
}

/// Splits "IP/PREFIX".
pub fn parse(cidr: &str) -> Result<(IpAddr, u8), AddrError> {
    let bad = || AddrError::Bad(cidr.to_string());
    let (ip, len) = cidr.split_once('/').ok_or_else(bad)?;
    let ip: IpAddr = ip.parse().map_err(|_| bad())?;
    let len: u8 = len.parse().map_err(|_| bad())?;
    let max = if ip.is_ipv4() { 32 } else { 128 };
    if len > max {
        return Err(bad());
    }
    Ok((ip, len))
}

/// Runs the configured address hook: `hook VERB CIDR`.
fn run_hook(hook: &std::path::Path, verb: &'static str, cidr: &str) -> Result<String, AddrError> {
    let out = Command::new(hook).args([verb, cidr]).output().map_err(AddrError::Hook)?;
    if !out.status.success() {
        return Err(AddrError::HookFailed {
            hook: hook.display().to_string(),
            verb,
            cidr: cidr.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::new())
}

fn netlink(what: &'static str, cidr: &str) -> impl FnOnce(floe_netfilter::NetfilterError) -> AddrError {
    let cidr = cidr.to_string();
    move |source| AddrError::Netlink { what, cidr, source }
}

/// Removes `cidr` from this host (or has `hook` release it). Returns the
/// interface it was on (empty with a hook).
pub fn remove(cidr: &str, hook: Option<&std::path::Path>) -> Result<String, AddrError> {
    if let Some(h) = hook {
        parse(cidr)?;
        return run_hook(h, "release", cidr);
    }
    let (addr, _) = parse(cidr)?;
    let found = rtnl::find_address(addr)
        .map_err(netlink("cannot look up", cidr))?
        .ok_or_else(|| AddrError::NotHere(cidr.to_string()))?;
    rtnl::delete_address(addr, found.prefix_len, found.ifindex).map_err(netlink("cannot remove", cidr))?;
    Ok(found.ifname)
}

/// Adds `cidr` on `dev`, or on the interface this host reaches its subnet
/// through, and announces it: IPv4 with a gratuitous ARP when `arping` is
/// installed (otherwise the first packet the restored connections send makes
/// the kernel ARP from the address, which refreshes the peers' caches); IPv6
/// without duplicate address detection and with an unsolicited neighbour
/// advertisement (`ndisc_notify`).
/// Returns the interface.
pub fn add(cidr: &str, dev: Option<&str>, hook: Option<&std::path::Path>) -> Result<String, AddrError> {
    if let Some(h) = hook {
        parse(cidr)?;
        return run_hook(h, "acquire", cidr);
    }
    let (addr, len) = parse(cidr)?;
    let ifindex = match dev {
        Some(d) => rtnl::interface_index(d).map_err(netlink("cannot find the interface for", cidr))?,
        None => rtnl::route_interface(addr).map_err(netlink("no route to the subnet of", cidr))?,
    };
    let dev = rtnl::interface_name(ifindex).map_err(netlink("cannot find the interface for", cidr))?;
    if addr.is_ipv6() {
        // Announced with an unsolicited neighbour advertisement, which
        // updates the peers' caches; usable at once (no duplicate address
        // detection: the address just left the source).
        let knob = format!("/proc/sys/net/ipv6/conf/{dev}/ndisc_notify");
        if let Err(e) = std::fs::write(&knob, "1") {
            tracing::warn!(path = %knob, error = %e, "cannot turn on neighbour advertisements");
        }
    }
    rtnl::add_address(addr, len, ifindex, true).map_err(netlink("cannot add", cidr))?;
    if addr.is_ipv4() {
        // Best effort, in the background: the migration does not wait for it.
        let _ = Command::new("arping")
            .args(["-U", "-c", "1", "-I", &dev, &addr.to_string()])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
    Ok(dev)
}

/// Removes `cidr` from interface `dev` (undoing [`add`]); with a hook, has
/// it release the address.
pub fn undo_add(cidr: &str, dev: &str, hook: Option<&std::path::Path>) -> Result<(), AddrError> {
    if let Some(h) = hook {
        return run_hook(h, "release", cidr).map(|_| ());
    }
    let (addr, len) = parse(cidr)?;
    let ifindex = rtnl::interface_index(dev).map_err(netlink("cannot find the interface for", cidr))?;
    rtnl::delete_address(addr, len, ifindex).map_err(netlink("cannot remove", cidr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_addresses() {
        assert_eq!(parse("10.1.2.3/24").ok(), Some(("10.1.2.3".parse().unwrap_or(IpAddr::from([0, 0, 0, 0])), 24)));
        assert!(parse("10.1.2.3").is_err());
        assert!(parse("10.1.2.3/33").is_err());
        assert!(parse("::1/128").is_ok());
        assert!(parse("x/1").is_err());
    }
}
