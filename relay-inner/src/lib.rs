//! relay-inner's library: its configuration and the change-data-capture forwarder (the
//! PostgreSQL streaming replication client, the pgoutput decoder, the source, the spool
//! and the shipper), as a library so they can be tested on their own.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod config;
pub mod replication;
pub mod shipper;
pub mod source;
pub mod spool;
