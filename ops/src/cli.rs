//! What both binaries' command lines share: logging flags, the exit path, and the
//! runtime that `run` starts.

use std::fmt::Display;
use std::future::Future;
use std::process::ExitCode;

use crate::logging::{self, LogFormat};

/// `--log-format` and `--log-level`, flattened into each binary's command line.
#[derive(Debug, clap::Args)]
pub struct LogArgs {
    /// Log line format.
    #[arg(long, value_enum, default_value_t = LogFormat::Text, global = true)]
    pub log_format: LogFormat,
    /// Log filter (e.g. "info", "relay_outer=debug"); overrides RUST_LOG.
    #[arg(long, global = true)]
    pub log_level: Option<String>,
}

impl LogArgs {
    /// Installs the logger these flags describe.
    pub fn init(&self) {
        logging::init(self.log_format, self.log_level.as_deref());
    }
}

/// Turns a command's result into the process exit code; an error is printed once, on
/// stderr, where the terminal or the journal shows it whatever the log settings.
pub fn exit<E: Display>(res: Result<(), E>) -> ExitCode {
    match res {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Runs `f` to completion on a multi-threaded tokio runtime.
pub fn block_on<F, E>(f: F) -> Result<(), E>
where
    F: Future<Output = Result<(), E>>,
    E: From<std::io::Error>,
{
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?
        .block_on(f)
}

/// Binds the admin endpoint, serves `app` on it until `drain` stops, keeps the
/// Prometheus histograms fresh, and tells systemd the relay is ready (and keeps its
/// watchdog fed while the runtime is responsive).
pub async fn start_admin(
    settings: &crate::admin::AdminSettings,
    app: axum::Router,
    prom: metrics_exporter_prometheus::PrometheusHandle,
    drain: crate::drain::Drain,
    tls: Option<tokio_rustls::TlsAcceptor>,
) -> Result<(), std::io::Error> {
    let listen = settings.listen;
    let sock = tokio::net::TcpListener::bind(listen).await.map_err(|e| {
        std::io::Error::new(e.kind(), format!("admin.listen: cannot bind {listen}: {e}"))
    })?;
    let addr = sock.local_addr().unwrap_or(listen);
    let scheme = settings.scheme();
    tracing::info!(listen = %addr, tokens = settings.tokens.len(), client_certificates = settings.tls.as_ref().is_some_and(|t| t.client_ca.is_some()),
        "admin endpoint ready: console at {scheme}://{addr}/ (also /metrics /healthz /readyz /status)");
    tokio::spawn(crate::http::serve_tls(
        sock,
        app,
        drain,
        crate::http::Limits::default(),
        tls,
    ));
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(std::time::Duration::from_secs(5));
        loop {
            tick.tick().await;
            prom.run_upkeep();
        }
    });
    crate::sdnotify::ready();
    // The watchdog is fed from a task on the same runtime as everything else: if the
    // runtime wedges, the pings stop and systemd restarts the relay.
    tokio::spawn(crate::sdnotify::watchdog_loop(|| true));
    Ok(())
}

/// The life of a running relay after start-up: SIGHUP runs `reload` (systemd is told
/// RELOADING, then READY), SIGTERM or SIGINT starts the shutdown: no new connections,
/// open streams get up to `grace()` to finish. `draining` says in the log what
/// shutting down means for this relay. Returns the streams still open at the end.
pub async fn run_until_stopped<R, F>(
    mut reload: R,
    drain: &crate::drain::Drain,
    grace: impl Fn() -> std::time::Duration,
    draining: &str,
) -> std::io::Result<usize>
where
    R: FnMut() -> F,
    F: Future<Output = Result<String, String>>,
{
    use tokio::signal::unix::{signal, SignalKind};
    let mut hup = signal(SignalKind::hangup()).map_err(|e| {
        std::io::Error::new(e.kind(), format!("cannot install the SIGHUP handler: {e}"))
    })?;
    // One termination future for the whole loop: its handlers stay registered while a
    // reload runs, so a SIGTERM that arrives then (or just after) is not lost.
    let term = crate::drain::termination_signal();
    tokio::pin!(term);
    let sig = loop {
        tokio::select! {
            sig = &mut term => break sig,
            _ = hup.recv() => {
                crate::sdnotify::reloading();
                match reload().await {
                    Ok(summary) => tracing::info!(%summary, "configuration reloaded"),
                    Err(e) => tracing::error!(reason = %e, "configuration reload rejected; the previous configuration stays in force"),
                }
                crate::sdnotify::ready();
            }
        }
    };
    let grace = grace();
    tracing::info!(
        signal = sig,
        open_streams = drain.active(),
        ?grace,
        "shutting down: {draining}"
    );
    crate::sdnotify::stopping();
    drain.stop();
    let left = drain.wait_idle(grace).await;
    if left > 0 {
        tracing::warn!(
            streams = left,
            "grace period over; closing the remaining streams"
        );
    }
    Ok(left)
}
