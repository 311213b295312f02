//! `relay-outer cdc sinks|pause|resume|replay`: talk to the running relay's admin
//! endpoint (the address in the configuration's `admin.listen`).

use std::path::Path;

use anyhow::{anyhow, bail, Context};

use crate::cdc::sink::clickhouse::http::percent_encode as encode;
use crate::config::Config;

/// One request to the admin endpoint of the relay configured in `config` (with its
/// token and TLS): the JSON answer of a 2xx, or an error with the relay's reason.
fn call(config: &Path, post: bool, path: &str) -> anyhow::Result<serde_json::Value> {
    let cfg = Config::load(config)?;
    if cfg.cdc.is_none() {
        bail!("{}: has no cdc section (no sinks)", config.display());
    }
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("starting a runtime")?;
    let method = if post { "POST" } else { "GET" };
    let (status, body) = rt
        .block_on(routy_ops::admin_client::request(&cfg.admin, method, path))
        .map_err(|e| anyhow!("{e}"))?;
    let v: serde_json::Value = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    if !(200..300).contains(&status) {
        let why = v["error"]
            .as_str()
            .map(str::to_string)
            .unwrap_or_else(|| body.trim().to_string());
        bail!("relay-outer refused ({status}): {why}");
    }
    Ok(v)
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
