//! relay-outer: accepts tunnels from inner relays and exposes their services on
//! listener ports.
#![forbid(unsafe_code)]

mod admin;
mod cdc;
mod certs;
mod config;
mod listen;
mod server;
mod tunnel;

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use routy_ops::cli::start_admin;
use routy_ops::cli::{self, LogArgs};
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
    /// Change data capture: look into the stored change logs.
    Cdc {
        #[command(subcommand)]
        cmd: CdcCmd,
    },
}

#[derive(Subcommand)]
enum CdcCmd {
    /// Print a source's stored changes as JSON lines, one per event. Reads the store
    /// without locking it: works while relay-outer runs or not.
    Tail {
        /// Configuration file (YAML); the store is its cdc.dir.
        #[arg(long, short, required_unless_present = "dir", conflicts_with = "dir")]
        config: Option<PathBuf>,
        /// The store directory (cdc.dir) instead of a configuration file.
        #[arg(long)]
        dir: Option<PathBuf>,
        /// Source as tunnel/source, e.g. site-a/orders.
        #[arg(long)]
        source: String,
        /// Start at this seq (default: the oldest record held).
        #[arg(long, conflicts_with = "since")]
        from: Option<u64>,
        /// Start at the first transaction committed at or after this time (RFC 3339,
        /// e.g. 2026-11-22T07:00:00Z).
        #[arg(long)]
        since: Option<String>,
        /// Keep printing new changes as they arrive.
        #[arg(long)]
        follow: bool,
        /// Stop after this many events.
        #[arg(long)]
        limit: Option<u64>,
    },
    /// List the running relay's sinks: kind, source, position, lag in records and
    /// seconds, state (running, retrying, paused, stopped), last error. Asks the admin
    /// endpoint (admin.listen).
    Sinks {
        /// Configuration file (YAML) of the running relay.
        #[arg(long, short)]
        config: PathBuf,
        /// Print the JSON the admin endpoint answers.
        #[arg(long)]
        json: bool,
    },
    /// Pause a sink on the running relay (after its current batch).
    Pause {
        /// Configuration file (YAML) of the running relay.
        #[arg(long, short)]
        config: PathBuf,
        /// Sink name.
        #[arg(long)]
        sink: String,
    },
    /// Resume a paused sink on the running relay.
    Resume {
        /// Configuration file (YAML) of the running relay.
        #[arg(long, short)]
        config: PathBuf,
        /// Sink name.
        #[arg(long)]
        sink: String,
    },
    /// Move a sink of the running relay back (or forward) to a position or a time; it
    /// re-delivers from there. For a PostgreSQL sink this rewrites its row in
    /// _routy.sink_offsets in the target.
    Replay {
        /// Configuration file (YAML) of the running relay.
        #[arg(long, short)]
        config: PathBuf,
        /// Sink name.
        #[arg(long)]
        sink: String,
        /// Position (SEQ or SEQ.INDEX, as events' ids and `cdc sinks` show them).
        #[arg(long, required_unless_present = "since", conflicts_with = "since")]
        from: Option<String>,
        /// The first transaction committed at or after this time (RFC 3339).
        #[arg(long)]
        since: Option<String>,
    },
    /// Repair a source's store that holds corrupt records relay-inner can no longer send
    /// again: put the part set aside at start back, keep every valid record, and put a
    /// marker in place of each unreadable one. Stop relay-outer first.
    Salvage {
        /// Configuration file (YAML); the store is its cdc.dir.
        #[arg(long, short)]
        config: PathBuf,
        /// Source as tunnel/source, e.g. site-a/orders.
        #[arg(long)]
        source: String,
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
    /// Revoke a client certificate: add it to the CA's revocation list DIR/crl.pem.
    /// relay-outer refuses it (and closes its sessions) once `tunnel.tls.crl` names that
    /// list and it reloads.
    Revoke {
        /// Directory holding ca.crt and ca.key (and crl.pem, created if missing).
        #[arg(long)]
        dir: PathBuf,
        /// Tunnel name: revokes DIR/<tunnel>.crt.
        #[arg(long, required_unless_present = "cert", conflicts_with = "cert")]
        tunnel: Option<String>,
        /// The certificate file to revoke, instead of a tunnel's.
        #[arg(long)]
        cert: Option<PathBuf>,
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
        Cmd::Cdc { cmd } => cdc_cmd(cmd),
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
        CertsCmd::Revoke { dir, tunnel, cert } => {
            let cert = match (cert, tunnel) {
                (Some(c), _) => c,
                (None, Some(t)) => {
                    certs::validate_tunnel_name(&t).map_err(anyhow::Error::msg)?;
                    dir.join(format!("{t}.crt"))
                }
                (None, None) => anyhow::bail!("give --tunnel NAME or --cert FILE"),
            };
            let r = certs::revoke(&dir, &cert)?;
            if r.already {
                println!(
                    "{} (serial {}) was already revoked",
                    cert.display(),
                    r.serial
                );
            } else {
                println!("revoked {} (serial {})", cert.display(), r.serial);
            }
            println!(
                "wrote {} ({} certificate(s) listed): name it in tunnel.tls.crl and reload relay-outer",
                r.crl.display(),
                r.listed
            );
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
    cfg.admin_tls().map_err(anyhow::Error::msg)?;
    let cdc = match &cfg.cdc {
        None => String::new(),
        Some(c) => {
            let sinks: Vec<String> = c
                .sinks
                .iter()
                .map(|s| format!("{} ({}) <- {}", s.name, s.kind.key(), s.source))
                .collect();
            let consumers = match &c.consumers {
                None => String::new(),
                Some(k) => {
                    let tokens =
                        cdc::consumers::load_tokens(&k.tokens).map_err(anyhow::Error::msg)?;
                    format!(", consumer endpoint {} with {} token(s)", k.listen, tokens)
                }
            };
            format!(
                ", cdc store {} with {} sink(s){}{consumers}",
                c.dir.display(),
                c.sinks.len(),
                if sinks.is_empty() {
                    String::new()
                } else {
                    format!(": {}", sinks.join(", "))
                }
            )
        }
    };
    println!(
        "{}: ok (tunnel port {}, {} listener(s){cdc})",
        path.display(),
        cfg.tunnel.listen,
        cfg.listeners.len()
    );
    Ok(())
}

fn cdc_cmd(cmd: CdcCmd) -> anyhow::Result<()> {
    match cmd {
        CdcCmd::Sinks { config, json } => cdc::sinks_cli::sinks(&config, json),
        CdcCmd::Pause { config, sink } => cdc::sinks_cli::pause(&config, &sink, true),
        CdcCmd::Resume { config, sink } => cdc::sinks_cli::pause(&config, &sink, false),
        CdcCmd::Replay {
            config,
            sink,
            from,
            since,
        } => cdc::sinks_cli::replay(&config, &sink, from.as_deref(), since.as_deref()),
        CdcCmd::Salvage { config, source } => {
            let cfg = Config::load(&config)?;
            let cdc = cfg.cdc.ok_or_else(|| {
                anyhow::anyhow!("{}: has no cdc section (no store)", config.display())
            })?;
            if !cdc.dir.join(&source).is_dir() {
                anyhow::bail!(
                    "no store for source {source:?} in {} (give tunnel/source)",
                    cdc.dir.display()
                );
            }
            let done = cdc::store::Store::salvage(&cdc.dir, &source)
                .map_err(|e| anyhow::anyhow!("salvaging the store of {source}: {e}"))?;
            if done.is_empty() {
                println!("the store of {source} has no damaged record and no set-aside part; nothing changed");
            }
            for line in done {
                println!("{line}");
            }
            Ok(())
        }
        CdcCmd::Tail {
            config,
            dir,
            source,
            from,
            since,
            follow,
            limit,
        } => {
            let root = match (dir, config) {
                (Some(d), _) => d,
                (None, Some(c)) => {
                    let cfg = Config::load(&c)?;
                    cfg.cdc
                        .ok_or_else(|| {
                            anyhow::anyhow!("{}: has no cdc section (no store)", c.display())
                        })?
                        .dir
                }
                (None, None) => anyhow::bail!("give --config or --dir"),
            };
            let since = since
                .map(|s| {
                    relay_proto::cdc::parse_time(&s).ok_or_else(|| {
                        anyhow::anyhow!(
                            "--since: {s:?} is not a time like 2026-11-22T07:00:00Z or 2026-11-22 08:00:00+01:00"
                        )
                    })
                })
                .transpose()?;
            let opts = cdc::tail::TailOptions {
                root,
                source,
                from,
                since,
                follow,
                limit,
                poll: cdc::tail::FOLLOW_POLL,
            };
            let stdout = std::io::stdout();
            let mut out = std::io::BufWriter::new(stdout.lock());
            cdc::tail::tail(&opts, &mut out, &|| false)?;
            Ok(())
        }
    }
}

fn run(path: &Path) -> anyhow::Result<()> {
    let cfg = Config::load(path)?;
    let tls = cfg.check_tls().map_err(anyhow::Error::msg)?;
    routy_ops::malloc::tune();
    routy_ops::fdlimit::raise();
    routy_tunnel::lanes::init(cfg.threads, "relay-outer")
        .map_err(|e| anyhow::anyhow!("cannot start {} data-path threads: {e}", cfg.threads))?;
    cli::block_on(serve(path.to_owned(), cfg, tls))
}

async fn serve(path: PathBuf, cfg: Config, tls: rustls::ServerConfig) -> anyhow::Result<()> {
    let admin = cfg.admin.clone();
    let admin_tls = cfg.admin_tls().map_err(anyhow::Error::msg)?;
    let prom = routy_ops::metrics::install().map_err(anyhow::Error::msg)?;
    cdc::describe_metrics();
    let relay = server::OuterRelay::start(path, cfg, tls).await?;
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
        "no new connections; open streams may finish",
    )
    .await?;
    for s in relay.registry.all() {
        s.handle.kill();
    }
    if let Some(cdc) = &relay.cdc {
        cdc.wait_stopped(relay.config().shutdown_grace).await;
    }
    info!("stopped");
    Ok(())
}

#[cfg(test)]
mod readme_metrics {
    use std::collections::BTreeMap;

    use routy_ops::metrics::Kind;

    /// Every metric either relay exports, from the lists each crate keeps.
    fn exported() -> BTreeMap<&'static str, Kind> {
        [
            routy_ops::metrics::ALL,
            relay_inner::cdc::METRICS,
            crate::cdc::METRICS,
            crate::cdc::sink::METRICS,
            crate::cdc::consumers::METRICS,
        ]
        .into_iter()
        .flatten()
        .map(|(name, _)| (*name, Kind::of(name)))
        .collect()
    }

    /// The README's metric tables: rows whose first cell names `routy_` metrics, with the
    /// kind in the second cell.
    fn documented() -> BTreeMap<String, String> {
        let readme = include_str!("../../README.md");
        let mut out = BTreeMap::new();
        for line in readme.lines().filter(|l| l.starts_with("| `routy_")) {
            let cells: Vec<&str> = line.split('|').map(str::trim).collect();
            let (names, kind) = (cells[1], cells[2]);
            for name in names.split(',').map(|n| n.trim().trim_matches('`')) {
                out.insert(name.to_string(), kind.to_string());
            }
        }
        out
    }

    #[test]
    fn the_readme_documents_every_metric_with_its_kind() {
        let (exported, documented) = (exported(), documented());
        for (name, kind) in &exported {
            match documented.get(*name) {
                None => panic!("{name} is exported but not in the README's metric tables"),
                Some(k) => assert_eq!(k, kind.as_str(), "README kind of {name}"),
            }
        }
        for name in documented.keys() {
            assert!(
                exported.contains_key(name.as_str()),
                "the README documents {name}, which no relay exports"
            );
        }
    }
}
