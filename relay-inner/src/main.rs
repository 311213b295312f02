//! relay-inner: dials out to relay-outer, keeps the tunnel up, and connects the streams
//! relay-outer opens to the services its own config lists.
#![forbid(unsafe_code)]

mod backoff;
mod config;
mod dialer;
mod services;
mod status;

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};
use relay_proto::cli::{self, LogArgs};
use relay_proto::drain::{termination_signal, Drain};
use relay_proto::splice::ByteCounters;
use tracing::{info, warn};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "relay-inner",
    version,
    about = "Routy relay-inner: dials out to relay-outer and serves the services it lists"
)]
struct Cli {
    #[command(flatten)]
    log: LogArgs,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the relay.
    Run {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
    /// Validate a configuration file, TLS files included, and exit.
    CheckConfig {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init();
    cli::exit(match cli.cmd {
        Cmd::Run { config } => run(&config),
        Cmd::CheckConfig { config } => check(&config),
    })
}

fn check(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    cfg.check_tls().map_err(anyhow::Error::msg)?;
    println!(
        "{}: ok ({} relay-outer endpoint(s), {} service(s))",
        path.display(),
        cfg.outer.len(),
        cfg.services.len()
    );
    Ok(())
}

fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let tls = cfg.check_tls().map_err(anyhow::Error::msg)?;
    cli::block_on(serve(cfg, tls))
}

async fn serve(cfg: Config, tls: rustls::ClientConfig) -> anyhow::Result<()> {
    let cfg = Arc::new(cfg);
    let drain = Drain::new();
    let services = Arc::new(services::Services {
        node: cfg.node.clone(),
        map: cfg.services.clone(),
        bytes: cfg
            .services
            .keys()
            .map(|k| {
                (
                    k.clone(),
                    Arc::new(ByteCounters::registered(&[("service", k.clone())])),
                )
            })
            .collect(),
        drain: drain.clone(),
    });
    let connector = tokio_rustls::TlsConnector::from(Arc::new(tls));
    info!(node = %cfg.node, services = ?cfg.services.keys().collect::<Vec<_>>(), "relay-inner starting");
    let mut dialers = Vec::new();
    for endpoint in &cfg.outer {
        let d = dialer::Dialer {
            cfg: cfg.clone(),
            endpoint: endpoint.clone(),
            connector: connector.clone(),
            services: services.clone(),
            drain: drain.clone(),
            status: Arc::new(status::EndpointStatus::new(&endpoint.addr)),
        };
        dialers.push(tokio::spawn(d.run()));
    }
    let sig = termination_signal().await;
    info!(signal = sig, open_streams = drain.active(), grace = ?cfg.shutdown_grace,
        "shutting down: telling relay-outer to send no new streams; open streams may finish");
    drain.stop();
    let left = drain.wait_idle(cfg.shutdown_grace).await;
    if left > 0 {
        warn!(
            streams = left,
            "grace period over; closing the remaining streams"
        );
    }
    info!("stopped");
    Ok(())
}
