//! relay-outer: accepts tunnels from inner relays and exposes their services on
//! listener ports.
#![forbid(unsafe_code)]

mod cdc;
mod certs;
mod config;
mod listener;
mod registry;
mod server;
mod status;
mod tunnel;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relay_proto::cli::start_admin;
use relay_proto::cli::{self, LogArgs};
use tracing::info;

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
    let r = relay.clone();
    relay_proto::cli::run_until_stopped(
        || {
            let r = r.clone();
            async move { r.reload().await }
        },
        &relay.drain,
        || relay.config().shutdown_grace,
        "no new connections; open streams may finish",
    )
    .await?;
    for s in relay.registry.all() {
        s.handle.kill();
    }
    info!("stopped");
    Ok(())
}
