//! The crate's error type.

use crate::ConnTuple;
use std::fmt;
use std::io;

/// An errno from a syscall or from the kernel's netlink answer.
///
/// Displays as the C library's description ("Operation not permitted")
/// followed by a hint for the errnos that have a usual cause here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The errno of an `io::Error` (`EIO` if it has none).
    pub(crate) fn of(e: &io::Error) -> Errno {
        Errno(e.raw_os_error().unwrap_or(libc::EIO))
    }

    fn hint(self) -> &'static str {
        match self.0 {
            libc::EPERM | libc::EACCES => " (needs CAP_NET_ADMIN)",
            libc::EOPNOTSUPP | libc::EPROTONOSUPPORT | libc::EAFNOSUPPORT => {
                " (nf_tables is not available: load the nf_tables module, e.g. `modprobe nf_tables`)"
            }
            libc::EEXIST => " (left over from an earlier run? remove_stale deletes floe's tables)",
            libc::ENOBUFS => " (netlink socket buffer overrun)",
            _ => "",
        }
    }
}

impl fmt::Display for Errno {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let text = io::Error::from_raw_os_error(self.0).to_string();
        // io::Error appends " (os error N)"; the description is enough.
        let text = text.split(" (os error").next().unwrap_or(&text);
        write!(f, "{text}{}", self.hint())
    }
}

/// What failed in the network lock, with the operation and the kernel's errno.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum NetfilterError {
    /// A table name (or prefix) that floe does not accept.
    #[error("invalid nftables table name {name:?}: {reason}")]
    InvalidName { name: String, reason: &'static str },
    /// A packet mark that cannot identify floe's own traffic.
    #[error("invalid packet mark {mark:#x} for nftables table {table}: {reason}")]
    InvalidMark { table: String, mark: u32, reason: &'static str },
    /// A connection the lock cannot express.
    #[error("cannot lock connection {tuple}: {reason}")]
    InvalidTuple { tuple: ConnTuple, reason: &'static str },
    /// A syscall failed or the kernel refused a netlink request.
    #[error("{op} failed: {errno}{}", kernel_message(.message))]
    Kernel {
        /// What was being done, e.g. "creating nftables table floe_x".
        op: String,
        errno: Errno,
        /// The kernel's extended-ack message, if it gave one.
        message: Option<String>,
    },
    /// The kernel's answer was missing, malformed or incomplete.
    #[error("{op} failed: {detail}")]
    Protocol { op: String, detail: String },
}

fn kernel_message(message: &Option<String>) -> String {
    message.as_ref().map(|m| format!(": {m}")).unwrap_or_default()
}

impl NetfilterError {
    /// The errno of a [`NetfilterError::Kernel`] error.
    pub fn errno(&self) -> Option<i32> {
        match self {
            NetfilterError::Kernel { errno, .. } => Some(errno.0),
            _ => None,
        }
    }

    pub(crate) fn os(op: impl Into<String>, e: &io::Error) -> Self {
        NetfilterError::Kernel { op: op.into(), errno: Errno::of(e), message: None }
    }

    pub(crate) fn protocol(op: impl Into<String>, detail: impl Into<String>) -> Self {
        NetfilterError::Protocol { op: op.into(), detail: detail.into() }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_read_well() {
        let e = NetfilterError::Kernel {
            op: "creating nftables table floe_x".into(),
            errno: Errno(libc::EPERM),
            message: None,
        };
        assert_eq!(
            e.to_string(),
            "creating nftables table floe_x failed: Operation not permitted (needs CAP_NET_ADMIN)"
        );
        assert_eq!(e.errno(), Some(libc::EPERM));
        let e = NetfilterError::Kernel { op: "x".into(), errno: Errno(libc::EOPNOTSUPP), message: Some("m".into()) };
        assert!(e.to_string().contains("load the nf_tables module"), "{e}");
        assert!(e.to_string().ends_with(": m"), "{e}");
    }
}
