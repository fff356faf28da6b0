//! floe's wire and storage messages. No I/O lives here: only message types
//! generated from `proto/*.proto` and the constants that frame them.

/// Checkpoint image messages (`floe.image.v1`).
pub mod image {
    #![allow(clippy::all, missing_docs)]
    include!(concat!(env!("OUT_DIR"), "/floe.image.v1.rs"));
}

pub use prost::Message;
