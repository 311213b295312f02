//! relay-inner's change-data-capture parts, as a library so they can be tested on their
//! own before the forwarder wires them up (issue 4): the PostgreSQL streaming
//! replication client and the pgoutput decoder.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod pgoutput;
pub mod replication;
