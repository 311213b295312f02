//! relay-inner's library: its configuration ([`config`]) and the change-data-capture
//! forwarder ([`cdc`]: the PostgreSQL streaming replication client, the source, the spool
//! and the shipper), as a library so they can be tested on their own. The binary adds the
//! tunnel side (`tunnel/`: dialer, services, endpoints), the relay that wires both
//! (`relay.rs`) and the admin endpoint above them (`admin.rs`).
#![forbid(unsafe_code)]
#![warn(missing_docs)]

pub mod cdc;
pub mod config;
