//! What both Routy relays share and must agree on: the wire frames and their codec, the
//! handshake and control stream, the tunnel session (TLS + yamux), TLS/PKI loading,
//! socket tuning and the splice.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod cdc;
pub mod cidr;
pub mod cli;
pub mod codec;
pub mod config_file;
pub mod control;
pub mod disk;
pub mod drain;
pub mod frame;
pub mod handshake;
pub mod lanes;
pub mod logging;
#[allow(unsafe_code)] // one libc call: mallopt (see the module)
pub mod malloc;
pub mod metrics;
pub mod net;
pub mod pg_tls;
pub mod quic;
pub mod sdnotify;
pub mod segment_log;
pub mod session;
pub mod splice;
pub mod tls;
pub mod units;
pub mod wbuf;
