//! `relay-outer cdc sinks|pause|resume|replay`: talk to the running relay's admin
//! endpoint (the address in the configuration's `admin.listen`).

use std::path::Path;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};

use crate::cdc::sink::clickhouse::http::percent_encode as encode;
use crate::config::Config;

/// How long the relay gets to answer.
const TIMEOUT: Duration = Duration::from_secs(30);

/// The admin endpoint's base URL for the relay configured in `config`.
fn base(config: &Path) -> anyhow::Result<String> {
    let cfg = Config::load(config)?;
    if cfg.cdc.is_none() {
        bail!("{}: has no cdc section (no sinks)", config.display());
    }
    let mut addr = cfg.admin_listen;
    if addr.ip().is_unspecified() {
        addr.set_ip(if addr.is_ipv4() {
            std::net::Ipv4Addr::LOCALHOST.into()
        } else {
            std::net::Ipv6Addr::LOCALHOST.into()
        });
    }
    Ok(format!("http://{addr}"))
}

/// One request to the admin endpoint: the JSON answer of a 2xx, or an error with the
/// relay's reason.
fn call(config: &Path, post: bool, path: &str) -> anyhow::Result<serde_json::Value> {
    let url = format!("{}{path}", base(config)?);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    rt.block_on(async {
        let tls = crate::cdc::sink::webhook::client_tls(None).map_err(|e| anyhow!(e))?;
        let client = reqwest::Client::builder()
            .tls_backend_preconfigured(tls)
            .timeout(TIMEOUT)
            .no_proxy()
            .build()
            .context("HTTP client")?;
        let req = if post {
            client.post(&url)
        } else {
            client.get(&url)
        };
        let resp = req.send().await.map_err(|e| {
            anyhow!(
                "cannot reach relay-outer's admin endpoint at {url}: {} (is relay-outer running with this configuration?)",
                routy_pg::tls::error_chain(&e)
            )
        })?;
        let status = resp.status();
        let body = resp.text().await.unwrap_or_default();
        let v: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
        if !status.is_success() {
            let why = v["error"].as_str().map(str::to_string).unwrap_or(body);
            bail!("relay-outer refused ({status}): {why}");
        }
        Ok(v)
    })
}

/// `cdc sinks`: one line per sink, or the JSON with `json`.
pub fn sinks(config: &Path, json: bool) -> anyhow::Result<()> {
    let v = call(config, false, "/v1/sinks")?;
    if json {
        println!("{}", serde_json::to_string_pretty(&v)?);
        return Ok(());
    }
    let rows: Vec<[String; 8]> = v
        .as_array()
        .map(|a| a.as_slice())
        .unwrap_or_default()
        .iter()
        .map(|s| {
            let text = |k: &str| match &s[k] {
                serde_json::Value::String(t) => t.clone(),
                serde_json::Value::Null => "-".into(),
                other => other.to_string(),
            };
            let secs = s["lag_seconds"]
                .as_f64()
                .map_or("-".into(), |x| format!("{x:.1}"));
            let mut state = text("state");
            if s["paused"] == true && state != "paused" {
                state = format!("{state} (pausing)");
            }
            [
                text("name"),
                text("kind"),
                text("source"),
                text("position"),
                text("lag_records"),
                secs,
                state,
                text("last_error"),
            ]
        })
        .collect();
    let head = [
        "NAME",
        "KIND",
        "SOURCE",
        "POSITION",
        "LAG",
        "LAG_S",
        "STATE",
        "LAST_ERROR",
    ];
    let mut width = head.map(str::len);
    for r in &rows {
        for (i, c) in r.iter().enumerate().take(7) {
            width[i] = width[i].max(c.len());
        }
    }
    let line = |cells: Vec<&str>| {
        let mut out = String::new();
        for (i, c) in cells.iter().enumerate() {
            if i < 7 {
                out.push_str(&format!("{c:<w$}  ", w = width[i]));
            } else {
                out.push_str(c);
            }
        }
        println!("{}", out.trim_end());
    };
    line(head.to_vec());
    for r in &rows {
        line(r.iter().map(String::as_str).collect());
    }
    Ok(())
}

/// `cdc pause` / `cdc resume`.
pub fn pause(config: &Path, sink: &str, paused: bool) -> anyhow::Result<()> {
    let verb = if paused { "pause" } else { "resume" };
    call(config, true, &format!("/v1/sinks/{}/{verb}", encode(sink)))?;
    println!(
        "sink {sink} {}",
        if paused {
            "pauses after its current batch"
        } else {
            "resumed"
        }
    );
    Ok(())
}

/// `cdc replay`: moves the sink to a position or a time.
pub fn replay(
    config: &Path,
    sink: &str,
    from: Option<&str>,
    since: Option<&str>,
) -> anyhow::Result<()> {
    let q = match (from, since) {
        (Some(p), None) => format!("from={}", encode(p)),
        (None, Some(t)) => format!("since={}", encode(t)),
        _ => bail!("give --from POSITION or --since TIME"),
    };
    let v = call(
        config,
        true,
        &format!("/v1/sinks/{}/replay?{q}", encode(sink)),
    )?;
    println!(
        "sink {sink} re-delivers from position {} (after its current batch)",
        v["position"].as_str().unwrap_or("?")
    );
    Ok(())
}
