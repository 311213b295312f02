//! Graceful shutdown: a signal that says "stop accepting", and a count of work in
//! flight that shutdown waits on for up to a grace period.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Notify};

/// Tracks in-flight work (spliced streams) and the shutdown signal.
#[derive(Debug, Clone)]
pub struct Drain {
    inner: Arc<Inner>,
    stop_rx: watch::Receiver<bool>,
}

#[derive(Debug)]
struct Inner {
    active: AtomicUsize,
    idle: Notify,
    stop_tx: watch::Sender<bool>,
}

/// Held while one piece of work runs.
#[derive(Debug)]
pub struct Guard(Arc<Inner>);

impl Drop for Guard {
    fn drop(&mut self) {
        if self.0.active.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.0.idle.notify_waiters();
        }
    }
}

impl Default for Drain {
    fn default() -> Self {
        Self::new()
    }
}

impl Drain {
    /// A new tracker, not stopping.
    pub fn new() -> Self {
        let (stop_tx, stop_rx) = watch::channel(false);
        Drain {
            inner: Arc::new(Inner {
                active: AtomicUsize::new(0),
                idle: Notify::new(),
                stop_tx,
            }),
            stop_rx,
        }
    }

    /// Counts one piece of work until the guard is dropped.
    pub fn guard(&self) -> Guard {
        self.inner.active.fetch_add(1, Ordering::AcqRel);
        Guard(self.inner.clone())
    }

    /// Work in flight now.
    pub fn active(&self) -> usize {
        self.inner.active.load(Ordering::Acquire)
    }

    /// Tells everyone to stop accepting.
    pub fn stop(&self) {
        let _ = self.inner.stop_tx.send(true);
    }

    /// Whether [`Drain::stop`] was called.
    pub fn is_stopping(&self) -> bool {
        *self.stop_rx.borrow()
    }

    /// Resolves once [`Drain::stop`] has been called.
    pub async fn stopping(&self) {
        let mut rx = self.stop_rx.clone();
        let _ = rx.wait_for(|s| *s).await;
    }

    /// Waits until no work is in flight or `grace` has passed; returns what is left.
    pub async fn wait_idle(&self, grace: Duration) -> usize {
        let deadline = tokio::time::Instant::now() + grace;
        loop {
            let notified = self.inner.idle.notified();
            if self.active() == 0 {
                return 0;
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                return self.active();
            }
        }
    }
}

/// Resolves on SIGTERM or SIGINT (Ctrl-C) and says which.
pub async fn termination_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    let term = signal(SignalKind::terminate());
    let int = signal(SignalKind::interrupt());
    match (term, int) {
        (Ok(mut t), Ok(mut i)) => tokio::select! {
            _ = t.recv() => "SIGTERM",
            _ = i.recv() => "SIGINT",
        },
        _ => {
            // Without signal handlers we can still stop on Ctrl-C.
            let _ = tokio::signal::ctrl_c().await;
            "SIGINT"
        }
    }
}
