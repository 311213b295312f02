//! relay-outer: accepts tunnels from inner relays and exposes their services on
//! listener ports.
#![forbid(unsafe_code)]

mod certs;
mod config;
mod listener;
mod registry;
mod server;
mod status;
mod tunnel;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use relay_proto::cli::start_admin;
use relay_proto::cli::{self, LogArgs};
use relay_proto::drain::termination_signal;
use relay_proto::sdnotify;
use tokio::signal::unix::{signal, SignalKind};
use tracing::{error, info, warn};

use crate::config::Config;

#[derive(Parser)]
#[command(
    name = "relay-outer",
    version,
    about = "Routy relay-outer: accepts tunnels from inner relays and exposes their services"
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
    /// Make and renew certificates.
    Certs {
        #[command(subcommand)]
        cmd: CertsCmd,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Create a CA and relay-outer's server certificate.
    Init {
        /// Directory for ca.crt, ca.key, outer.crt, outer.key.
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address inner relays dial (repeatable).
        #[arg(long = "server-name", required = true)]
        server_names: Vec<String>,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Issue a client certificate for one inner relay; its identity is the tunnel name.
    Issue {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// Tunnel name (the certificate's CN).
        #[arg(long)]
        tunnel: String,
        /// Overwrite existing files.
        #[arg(long)]
        force: bool,
    },
    /// Re-issue relay-outer's server certificate from the existing CA.
    RenewOuter {
        /// Directory holding ca.crt and ca.key.
        #[arg(long)]
        dir: PathBuf,
        /// DNS name or IP address inner relays dial (repeatable).
        #[arg(long = "server-name", required = true)]
        server_names: Vec<String>,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init();
    cli::exit(match cli.cmd {
        Cmd::Run { config } => run(&config),
        Cmd::CheckConfig { config } => check(&config),
        Cmd::Certs { cmd } => certs_cmd(cmd),
    })
}

fn print_written(paths: Vec<PathBuf>) {
    for p in paths {
        println!("wrote {}", p.display());
    }
}

fn certs_cmd(cmd: CertsCmd) -> anyhow::Result<()> {
    match cmd {
        CertsCmd::Init {
            dir,
            server_names,
            force,
        } => print_written(certs::init(&dir, &server_names, force)?),
        CertsCmd::Issue { dir, tunnel, force } => {
            print_written(certs::issue(&dir, &tunnel, force)?)
        }
        CertsCmd::RenewOuter { dir, server_names } => {
            print_written(certs::renew_outer(&dir, &server_names)?)
        }
    }
    Ok(())
}

fn check(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    cfg.check_tls().map_err(anyhow::Error::msg)?;
    println!(
        "{}: ok (tunnel port {}, {} listener(s))",
        path.display(),
        cfg.tunnel.listen,
        cfg.listeners.len()
    );
    Ok(())
}

fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let tls = cfg.check_tls().map_err(anyhow::Error::msg)?;
    cli::block_on(serve(path.to_owned(), cfg, tls))
}

async fn serve(path: PathBuf, cfg: Config, tls: rustls::ServerConfig) -> anyhow::Result<()> {
    let admin_listen = cfg.admin_listen;
    let prom = relay_proto::metrics::install().map_err(anyhow::Error::msg)?;
    let relay = server::OuterRelay::start(path, cfg, tls).await?;
    let handler = {
        let (relay, prom) = (relay.clone(), prom.clone());
        move |path: &str| status::handle(&relay, &prom, path)
    };
    start_admin(admin_listen, handler, prom, relay.drain.clone()).await?;
    let mut hup = signal(SignalKind::hangup()).context("cannot install the SIGHUP handler")?;
    let sig = loop {
        tokio::select! {
            sig = termination_signal() => break sig,
            _ = hup.recv() => {
                sdnotify::reloading();
                match relay.reload().await {
                    Ok(summary) => info!(%summary, "configuration reloaded"),
                    Err(e) => error!(reason = %e, "configuration reload rejected; the previous configuration stays in force"),
                }
                sdnotify::ready();
            }
        }
    };
    let drain = &relay.drain;
    let grace = relay.config().shutdown_grace;
    info!(
        signal = sig,
        open_streams = drain.active(),
        ?grace,
        "shutting down: no new connections; open streams may finish"
    );
    sdnotify::stopping();
    drain.stop();
    let left = drain.wait_idle(grace).await;
    if left > 0 {
        warn!(
            streams = left,
            "grace period over; closing the remaining streams"
        );
    }
    for s in relay.registry.all() {
        s.handle.kill();
    }
    info!("stopped");
    Ok(())
}
