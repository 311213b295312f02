//! The tunnel runtime: everything that moves bytes between the relays.
//!
//! Read in this order: [`tls`] (identities, the mTLS configs, chain rules and revocation;
//! [`expiry`] watches the certificates), [`net`] (socket
//! options), [`codec`] and [`handshake`] (frames over a stream, with deadlines),
//! [`control`] (the keepalive and control loop), [`wbuf`] and [`session`] (a TLS
//! connection carrying yamux streams), [`quic`] (the same over QUIC), [`lanes`]
//! (data-path threads), [`splice`] (a client stream joined to a tunnel stream),
//! [`ship`] (CDC shipping messages over a stream), [`cidr`] (source allowlists), [`proxy`]
//! (HTTP CONNECT and SOCKS5 proxies on the way out), [`websocket`] (the tunnel inside a
//! WebSocket), [`throttle`] (bandwidth limits).
//! The frames themselves are defined, sans-IO, in `relay-proto`. See
//! `docs/architecture.md`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod cidr;
pub mod codec;
pub mod control;
pub mod expiry;
pub mod handshake;
pub mod lanes;
pub mod net;
pub mod proxy;
pub mod quic;
pub mod session;
pub mod ship;
pub mod splice;
pub mod throttle;
pub mod tls;
pub mod wbuf;
pub mod websocket;
