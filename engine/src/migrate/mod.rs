//! Live migration, engine side: the pre-copy passes on the source host and
//! the staged restore on the target host. The agents move the bytes; this
//! module decides which pages a pass must send and applies what arrives.
//!
//! Source ([`Source`]): pass 0 stops the tree for an instant to collect its
//! whole state (like a dump) and starts dirty tracking, then streams every
//! present page while it runs. Each later pass stops it only to scan the
//! tracker and streams the pages written since. The final pass freezes the
//! tree for good and writes a small image (state, the last delta, blobs) in
//! a local directory; the tree stays frozen until the caller kills it
//! (committed) or resumes it (aborted).
//!
//! Target ([`Staged`]): builds the stopped process tree from pass 0's state
//! (restore stage a) and writes pages into it as they arrive (stage b);
//! mappings are brought up to date before each pass's pages. The final
//! image is applied with the tree still stopped ([`Staged::finish`]), and
//! the tree runs only when [`Finished::release`] is called (commit).
pub mod preflight;
mod source;
mod target;

pub use source::{PassReport, Source, SourceOptions};
pub use target::{image_connections, Finished, Staged};
