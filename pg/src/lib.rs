//! PostgreSQL plumbing shared by relay-inner's CDC source and relay-outer's PostgreSQL
//! sink: one connection-string parser ([`dsn`], both the `key=value` and the URL form)
//! and TLS for libpq-style connections ([`tls`]). See `docs/architecture.md`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod dsn;
pub mod tls;
