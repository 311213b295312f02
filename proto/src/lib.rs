//! Routy's wire protocol, sans-IO: what both relays must agree on byte for byte.
//!
//! - [`frame`]: the tunnel's frames (handshake `Hello`/`HelloAck`, stream open and
//!   refusal, keepalive, `GoAway`) and their encoding.
//! - [`cdc`]: the change stream: events decoded from PostgreSQL, the records relay-inner
//!   spools and relay-outer stores, the shipping messages between them, LSNs and times.
//! - [`pgoutput`]: PostgreSQL's logical replication messages, decoded; [`copy_text`]: a
//!   line of `COPY ... TO STDOUT` text; [`lsn`]: WAL positions.
//!
//! Nothing here does I/O or depends on a runtime: the tunnel runtime (`routy-tunnel`)
//! reads and writes these types over sockets, and the fuzz targets feed them bytes. See
//! `docs/architecture.md` for the layers above.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cdc;
pub mod copy_text;
pub mod frame;
pub mod lsn;
pub mod pgoutput;
