//! floe-agent: the per-host daemon that moves live processes between hosts.
//!
//! See docs/protocol.md for the peer protocol and docs/design.md for the
//! overall design.
pub mod certs;
pub mod config;
pub mod tls;
