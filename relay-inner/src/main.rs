//! relay-inner: dials out to relay-outer, keeps the tunnel up, and connects the streams
//! relay-outer opens to the services its own config lists.
#![forbid(unsafe_code)]

mod dialer;
mod relay;
mod services;
mod status;

use relay_inner::{backoff, config};

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use relay_proto::cli::start_admin;
use relay_proto::cli::{self, LogArgs};
use tracing::info;

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
    cli::block_on(serve(path.to_owned(), cfg, tls))
}

async fn serve(path: PathBuf, cfg: Config, tls: rustls::ClientConfig) -> anyhow::Result<()> {
    info!(node = %cfg.node, services = ?cfg.services.keys().collect::<Vec<_>>(), "relay-inner starting");
    let admin_listen = cfg.admin_listen;
    let prom = relay_proto::metrics::install().map_err(anyhow::Error::msg)?;
    let relay = relay::InnerRelay::start(path, cfg, tls);
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
        "telling relay-outer to send no new streams; open streams may finish",
    )
    .await?;
    info!("stopped");
    Ok(())
}
