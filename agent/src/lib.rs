//! floe-agent: the per-host daemon that moves live processes between hosts.
//!
//! See docs/protocol.md for the peer protocol and docs/design.md for the
//! overall design.
pub mod batch;
pub mod certs;
pub mod config;
pub mod control;
pub mod events;
pub mod journal;
pub mod netaddr;
pub mod received;
pub mod source;
pub mod state;
pub mod sys;
pub mod target;
pub mod tls;
pub mod wire;
pub mod worker;
