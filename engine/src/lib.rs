//! floe's native checkpoint/restore engine.
//!
//! * [`dump`] freezes a process with ptrace, collects its state and writes an
//!   image ([`image`]).
//! * [`restore`] rebuilds a process from an image in three stages (create
//!   the stub and its address space, write pages, finish) so that live
//!   migration can run the first two while the source still runs.
//! * [`check`] probes the running kernel for what floe needs.
pub mod check;
pub mod dump;
pub mod fdkinds;
pub mod image;
pub mod inject;
pub mod migrate;
pub mod pin;
pub mod procfs;
pub mod restore;
pub mod sys;
pub mod track;
