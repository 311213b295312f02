//! relay-inner: dials out to relay-outer, keeps the tunnel up, and connects the streams
//! relay-outer opens to the services its own config lists.
#![forbid(unsafe_code)]

mod admin;
mod relay;
mod tunnel;

use relay_inner::config;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use routy_ops::cli::start_admin;
use routy_ops::cli::{self, LogArgs};
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
    /// Change data capture maintenance.
    Cdc {
        #[command(subcommand)]
        cmd: CdcCmd,
    },
}

#[derive(Subcommand)]
enum CdcCmd {
    /// Drop a source's replication slot on its PostgreSQL and forget its snapshot
    /// progress, so the next start creates a new slot and copies the tables again.
    /// Stop relay-inner first.
    DropSlot {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Source name (cdc.sources[].name).
        #[arg(long)]
        source: String,
    },
    /// Copy one table of a source again while streaming goes on (on the running relay,
    /// through its admin endpoint): in chunks by key, watermark-style; the sinks replace
    /// the table's rows without emptying it. Progress: `/status` and
    /// routy_cdc_source_resync_rows_total. Resumes after a restart.
    Resync {
        /// Configuration file (YAML) of the running relay-inner.
        #[arg(long, short)]
        config: PathBuf,
        /// Source name (cdc.sources[].name).
        #[arg(long)]
        source: String,
        /// The table, schema.table, as postgres.tables lists it.
        #[arg(long)]
        table: String,
    },
    /// Repair a corrupt spool (relay-inner refuses to start a source whose spool has a
    /// damaged record followed by valid ones): keep every valid record, put a marker in
    /// place of each unreadable one. Stop relay-inner first.
    Salvage {
        /// Configuration file (YAML).
        #[arg(long, short)]
        config: PathBuf,
        /// Source name (cdc.sources[].name).
        #[arg(long)]
        source: String,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli.log.init();
    cli::exit(match cli.cmd {
        Cmd::Run { config } => run(&config),
        Cmd::CheckConfig { config } => check(&config),
        Cmd::Cdc {
            cmd: CdcCmd::DropSlot { config, source },
        } => drop_slot(&config, &source),
        Cmd::Cdc {
            cmd: CdcCmd::Salvage { config, source },
        } => salvage(&config, &source),
        Cmd::Cdc {
            cmd:
                CdcCmd::Resync {
                    config,
                    source,
                    table,
                },
        } => resync(&config, &source, &table),
    })
}

fn resync(path: &Path, name: &str, table: &str) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let (_, src) = cdc_source(&cfg, path, name)?;
    if !src.tables.iter().any(|t| t == table) {
        anyhow::bail!(
            "source {name} does not forward table {table:?} (postgres.tables: {:?})",
            src.tables
        );
    }
    let path = format!(
        "/v1/cdc/sources/{}/resync?table={}",
        routy_ops::admin_client::percent_encode(name),
        routy_ops::admin_client::percent_encode(table)
    );
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let (status, body) = rt
        .block_on(routy_ops::admin_client::request(&cfg.admin, "POST", &path))
        .map_err(anyhow::Error::msg)?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    if !(200..300).contains(&status) {
        let why = v["error"].as_str().map_or(body.trim(), |s| s);
        anyhow::bail!("relay-inner refused ({status}): {why}");
    }
    println!(
        "resync of {table} (source {name}) requested; follow it in /status \
         (cdc.sources[].source.resync) or routy_cdc_source_resync_rows_total"
    );
    Ok(())
}

fn salvage(path: &Path, name: &str) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let (cdc, src) = cdc_source(&cfg, path, name)?;
    println!("{}", relay_inner::cdc::source_salvage(cdc, &src.name)?);
    Ok(())
}

/// The cdc section and source `name` of `cfg`, or an error naming the known sources.
fn cdc_source<'a>(
    cfg: &'a Config,
    path: &Path,
    name: &str,
) -> anyhow::Result<(&'a config::CdcConfig, &'a config::SourceConfig)> {
    let Some(cdc) = cfg.cdc.as_ref() else {
        anyhow::bail!("{}: has no cdc section", path.display());
    };
    let Some(src) = cdc.sources.iter().find(|s| s.name == name) else {
        let known: Vec<&str> = cdc.sources.iter().map(|s| s.name.as_str()).collect();
        anyhow::bail!(
            "no cdc source named {name:?} in {} (sources: {known:?})",
            path.display()
        );
    };
    Ok((cdc, src))
}

fn drop_slot(path: &Path, name: &str) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let (cdc, src) = cdc_source(&cfg, path, name)?;
    let dir = cdc.spool_dir.join(&src.name);
    cli::block_on(async {
        let msg = relay_inner::cdc::source_drop_slot(src, &dir).await?;
        println!("{msg}");
        Ok::<_, anyhow::Error>(())
    })
}

fn check(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    cfg.check_tls().map_err(anyhow::Error::msg)?;
    cfg.admin_tls().map_err(anyhow::Error::msg)?;
    println!(
        "{}: ok ({} relay-outer endpoint(s), {} service(s), {} cdc source(s))",
        path.display(),
        cfg.outer.len(),
        cfg.services.len(),
        cfg.cdc.as_ref().map_or(0, |c| c.sources.len())
    );
    Ok(())
}

fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let tls = cfg.check_tls().map_err(anyhow::Error::msg)?;
    routy_ops::malloc::tune();
    routy_ops::fdlimit::raise();
    routy_tunnel::lanes::init(cfg.threads, "relay-inner")
        .map_err(|e| anyhow::anyhow!("cannot start {} data-path threads: {e}", cfg.threads))?;
    cli::block_on(serve(path.to_owned(), cfg, tls))
}

async fn serve(path: PathBuf, cfg: Config, tls: rustls::ClientConfig) -> anyhow::Result<()> {
    info!(node = %cfg.node, services = ?cfg.services.keys().collect::<Vec<_>>(), "relay-inner starting");
    let admin = cfg.admin.clone();
    let admin_tls = cfg.admin_tls().map_err(anyhow::Error::msg)?;
    let prom = routy_ops::metrics::install().map_err(anyhow::Error::msg)?;
    let relay = relay::InnerRelay::start(path, cfg, tls)?;
    let app = admin::router(relay.clone(), prom.clone());
    start_admin(&admin, app, prom, relay.drain.clone(), admin_tls).await?;
    let r = relay.clone();
    routy_ops::cli::run_until_stopped(
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
