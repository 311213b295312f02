//! Certificate expiry: a gauge per certificate a relay uses, and a warning from 14 days
//! before it expires.
//!
//! [`watch`] is called at start and after every reload with the files the current
//! configuration names; a task started by the first call checks them again every 12
//! hours, so a relay that runs for months warns in time without a reload.

use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use routy_ops::metrics as m;

/// How long before expiry the log warns.
pub const WARN_BEFORE: Duration = Duration::from_secs(14 * 86_400);

/// How often the files are checked again between reloads.
const RECHECK: Duration = Duration::from_secs(12 * 3600);

/// The files being watched: (configuration key, file).
fn watched() -> &'static Mutex<Vec<(&'static str, PathBuf)>> {
    static W: OnceLock<Mutex<Vec<(&'static str, PathBuf)>>> = OnceLock::new();
    W.get_or_init(|| Mutex::new(Vec::new()))
}

/// Sets the expiry gauge of every certificate in `files` (configuration key, file) and
/// logs a warning for each that expires within [`WARN_BEFORE`] (an error once expired);
/// keeps checking them every 12 hours (needs a tokio runtime the first time).
pub fn watch(files: Vec<(&'static str, PathBuf)>) {
    *watched().lock().unwrap_or_else(|p| p.into_inner()) = files;
    check();
    static TIMER: OnceLock<()> = OnceLock::new();
    TIMER.get_or_init(|| {
        if let Ok(rt) = tokio::runtime::Handle::try_current() {
            rt.spawn(async {
                let mut tick = tokio::time::interval(RECHECK);
                tick.tick().await;
                loop {
                    tick.tick().await;
                    check();
                }
            });
        }
    });
}

fn check() {
    let files = watched().lock().unwrap_or_else(|p| p.into_inner()).clone();
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    for (key, file) in files {
        let list = match crate::tls::expiries(&file) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(key, error = %e, "cannot read a certificate to check its expiry");
                continue;
            }
        };
        for e in list {
            metrics::gauge!(m::CERT_EXPIRY, "key" => key, "subject" => e.subject.clone())
                .set(e.not_after as f64);
            let left = e.not_after - now;
            let days = left as f64 / 86_400.0;
            if left <= 0 {
                tracing::error!(key, file = %file.display(), subject = %e.subject,
                    days_ago = format!("{:.1}", -days),
                    "certificate has expired: renew it (see certs/README.md)");
            } else if left <= WARN_BEFORE.as_secs() as i64 {
                tracing::warn!(key, file = %file.display(), subject = %e.subject,
                    days_left = format!("{days:.1}"),
                    "certificate expires soon: renew it (see certs/README.md)");
            }
        }
    }
}
