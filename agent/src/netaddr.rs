//! Moving a service address between hosts (`floe migrate --move-address`):
//! removed on the source after the freeze, added on the target before the
//! connections are restored, and announced there. Uses iproute2's `ip`
//! (outside the freeze-sensitive lock path: a few milliseconds per call).
use std::net::IpAddr;
use std::process::Command;

#[derive(Debug, thiserror::Error)]
pub enum AddrError {
    #[error("cannot run the address hook")]
    Hook(#[source] std::io::Error),
    #[error("{0:?} is not an address with a prefix length (IP/PREFIX)")]
    Bad(String),
    #[error("cannot run `ip` (install iproute2)")]
    NoIp(#[source] std::io::Error),
    #[error("`ip {args}` failed: {stderr}")]
    Failed { args: String, stderr: String },
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

fn ip(args: &[&str]) -> Result<String, AddrError> {
    let out = Command::new("ip").args(args).output().map_err(AddrError::NoIp)?;
    if !out.status.success() {
        return Err(AddrError::Failed {
            args: args.join(" "),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The interface holding `addr` on this host.
fn device_of(addr: IpAddr) -> Result<Option<String>, AddrError> {
    let s = addr.to_string();
    let out = ip(&["-o", "addr", "show", "to", &s])?;
    Ok(out.split_whitespace().nth(1).map(|d| d.trim_end_matches(':').to_string()))
}

/// Runs the configured address hook: `hook VERB CIDR`.
fn run_hook(hook: &std::path::Path, verb: &str, cidr: &str) -> Result<String, AddrError> {
    let out = Command::new(hook).args([verb, cidr]).output().map_err(AddrError::Hook)?;
    if !out.status.success() {
        return Err(AddrError::Failed {
            args: format!("(address hook {}) {verb} {cidr}", hook.display()),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        });
    }
    Ok(String::new())
}

/// Removes `cidr` from this host (or has `hook` release it). Returns the
/// interface it was on (empty with a hook).
pub fn remove(cidr: &str, hook: Option<&std::path::Path>) -> Result<String, AddrError> {
    if let Some(h) = hook {
        parse(cidr)?;
        return run_hook(h, "release", cidr);
    }
    let (addr, _) = parse(cidr)?;
    let dev = device_of(addr)?.ok_or_else(|| AddrError::NotHere(cidr.to_string()))?;
    ip(&["addr", "del", cidr, "dev", &dev])?;
    Ok(dev)
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
    let (addr, _) = parse(cidr)?;
    let dev = match dev {
        Some(d) => d.to_string(),
        None => {
            let s = addr.to_string();
            let out = ip(&["-o", "route", "get", &s])?;
            let mut words = out.split_whitespace();
            let mut dev = None;
            while let Some(w) = words.next() {
                if w == "dev" {
                    dev = words.next().map(str::to_string);
                    break;
                }
            }
            dev.ok_or_else(|| AddrError::Failed { args: format!("route get {s}"), stderr: "no device".into() })?
        }
    };
    if addr.is_ipv6() {
        // Usable at once (no duplicate address detection: the address just
        // left the source), and announced with an unsolicited neighbour
        // advertisement, which updates the peers' caches.
        let knob = format!("/proc/sys/net/ipv6/conf/{dev}/ndisc_notify");
        if let Err(e) = std::fs::write(&knob, "1") {
            tracing::warn!(path = %knob, error = %e, "cannot turn on neighbour advertisements");
        }
        ip(&["addr", "add", cidr, "dev", &dev, "nodad"])?;
    } else {
        ip(&["addr", "add", cidr, "dev", &dev])?;
    }
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
