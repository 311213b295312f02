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
static WATCHED: Mutex<Vec<(&'static str, PathBuf)>> = Mutex::new(Vec::new());

/// Sets the expiry gauge of every certificate in `files` (configuration key, file) and
/// logs a warning for each that expires within [`WARN_BEFORE`] (an error once expired);
/// keeps checking them every 12 hours (needs a tokio runtime the first time).
pub fn watch(files: Vec<(&'static str, PathBuf)>) {
    *WATCHED.lock().unwrap_or_else(|p| p.into_inner()) = files;
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
    let files = WATCHED.lock().unwrap_or_else(|p| p.into_inner()).clone();
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
            let days = (e.not_after - now) as f64 / 86_400.0;
            match verdict(e.not_after, now) {
                Verdict::Expired => tracing::error!(key, file = %file.display(),
                    subject = %e.subject, days_ago = format!("{:.1}", -days),
                    "certificate has expired: renew it (see certs/README.md)"),
                Verdict::Soon => tracing::warn!(key, file = %file.display(),
                    subject = %e.subject, days_left = format!("{days:.1}"),
                    "certificate expires soon: renew it (see certs/README.md)"),
                Verdict::Fine => {}
            }
        }
    }
}

/// What a certificate's expiry calls for.
#[derive(Debug, PartialEq, Eq)]
enum Verdict {
    Fine,
    /// Within [`WARN_BEFORE`].
    Soon,
    Expired,
}

fn verdict(not_after: i64, now: i64) -> Verdict {
    let left = not_after - now;
    if left <= 0 {
        Verdict::Expired
    } else if left <= WARN_BEFORE.as_secs() as i64 {
        Verdict::Soon
    } else {
        Verdict::Fine
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warns_from_fourteen_days_before() {
        let day = 86_400;
        let now = 1_800_000_000;
        assert_eq!(verdict(now + 15 * day, now), Verdict::Fine);
        assert_eq!(verdict(now + 14 * day, now), Verdict::Soon);
        assert_eq!(verdict(now + 1, now), Verdict::Soon);
        assert_eq!(verdict(now, now), Verdict::Expired);
        assert_eq!(verdict(now - day, now), Verdict::Expired);
    }
}
