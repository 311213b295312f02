//! The durable log: append-only segment files with checksummed records, under
//! relay-inner's spool and relay-outer's store, and the file-system helpers durability
//! needs. See `docs/architecture.md`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod disk;
pub mod segment_log;
