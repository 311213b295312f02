//! The operational pieces both relays share: how they are run, configured and watched.
//!
//! - [`cli`]: the common command-line skeleton (run, check-config, reload, signals).
//! - [`admin`]: who may use the admin endpoint (tokens, roles, TLS, the audit line).
//! - [`console`]: the operator's web page; [`history`]: the last 15 minutes of its charts.
//! - [`config_file`], [`units`]: loading a YAML configuration, durations, sizes, paths.
//! - [`http`], [`metrics`]: the HTTP server (admin endpoint, consumer API) and every
//!   metric's name.
//! - [`sdnotify`], [`logging`], [`drain`]: systemd notification, log setup, graceful stop.
//! - [`malloc`]: allocator tuning, [`give_back`]: memory back after a burst; [`backoff`]: retry delays with jitter.
//!
//! See `docs/architecture.md`.
#![deny(unsafe_code)]
#![warn(missing_docs)]

pub mod admin;
pub mod admin_client;
pub mod backoff;
pub mod cli;
pub mod config_file;
pub mod console;
pub mod drain;
#[allow(unsafe_code)] // getrlimit and setrlimit (see the module)
pub mod fdlimit;
pub mod give_back;
pub mod history;
pub mod http;
pub mod logging;
#[allow(unsafe_code)] // one libc call: mallopt (see the module)
pub mod malloc;
pub mod metrics;
pub mod sdnotify;
pub mod units;
