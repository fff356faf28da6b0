//! floe's wire and storage messages. No I/O lives here: only message types
//! generated from `proto/*.proto` and the constants that frame them.

/// Checkpoint image messages (`floe.image.v1`).
pub mod image {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/floe.image.v1.rs"));
}

pub use prost::Message;

/// Peer protocol between agents (`floe.peer.v1`).
pub mod peer {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/floe.peer.v1.rs"));
}

/// Control API between `floe` and its agent (`floe.control.v1`).
pub mod control {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/floe.control.v1.rs"));
}

pub mod frame;
