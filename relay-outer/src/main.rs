//! relay-outer: accepts tunnels from inner relays and exposes their services on
//! listener ports.
#![forbid(unsafe_code)]

mod certs;
mod config;
mod listener;
mod registry;
mod tunnel;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use clap::{Parser, Subcommand};
use relay_proto::cli::{self, LogArgs};
use relay_proto::drain::{termination_signal, Drain};
use relay_proto::splice::ByteCounters;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tracing::{info, warn};

use crate::config::Config;
use crate::registry::Registry;

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
    cli::block_on(serve(cfg, tls))
}

async fn serve(cfg: Config, tls: rustls::ServerConfig) -> anyhow::Result<()> {
    let drain = Drain::new();
    let registry = Arc::new(Registry::default());

    // Bind everything first: a port that cannot be bound is a startup error.
    let tunnel_sock = TcpListener::bind(cfg.tunnel.listen)
        .await
        .with_context(|| format!("tunnel.listen: cannot bind {}", cfg.tunnel.listen))?;
    let mut bound = Vec::new();
    for l in &cfg.listeners {
        let sock = TcpListener::bind(l.bind)
            .await
            .with_context(|| format!("listener {}: cannot bind {}", l.name, l.bind))?;
        bound.push((l.clone(), sock));
    }

    let server = Arc::new(tunnel::TunnelServer {
        cfg: cfg.tunnel.clone(),
        acceptor: tokio_rustls::TlsAcceptor::from(Arc::new(tls)),
        tunnels: cfg.tunnels(),
        registry: registry.clone(),
        drain: drain.clone(),
    });
    let addr = tunnel_sock.local_addr().unwrap_or(cfg.tunnel.listen);
    info!(listen = %addr, "tunnel port ready");
    tokio::spawn(server.serve(tunnel_sock));

    let mut counters: HashMap<String, Arc<ByteCounters>> = HashMap::new();
    for (l, sock) in bound {
        let bytes = counters.entry(l.name.clone()).or_default().clone();
        info!(listener = %l.name, bind = %l.bind, tunnel = %l.tunnel, service = %l.service, "listener ready");
        let listener = Arc::new(listener::Listener {
            slots: Arc::new(Semaphore::new(l.max_connections)),
            cfg: l,
            registry: registry.clone(),
            bytes,
            drain: drain.clone(),
        });
        tokio::spawn(listener.serve(sock));
    }

    let sig = termination_signal().await;
    let open = drain.active();
    info!(signal = sig, open_streams = open, grace = ?cfg.shutdown_grace, "shutting down: no new connections; open streams may finish");
    drain.stop();
    let left = drain.wait_idle(cfg.shutdown_grace).await;
    if left > 0 {
        warn!(
            streams = left,
            "grace period over; closing the remaining streams"
        );
    }
    for s in registry.all() {
        s.handle.kill();
    }
    info!("stopped");
    Ok(())
}
