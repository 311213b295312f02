//! The Grafana dashboard and the Prometheus alert rules in `deploy/`:
//!
//! - the dashboard's JSON is well formed for Grafana (unique panel ids, a data source,
//!   a place on the grid and a description on every panel, a refId on every target, no
//!   undefined variable);
//! - promtool accepts the rules and their unit tests pass, and every query of the
//!   dashboard is valid PromQL;
//! - every metric the dashboard and the rules use is really exported by a real
//!   relay-outer and relay-inner (a listener with a client through the tunnel, a CDC
//!   source and a PostgreSQL sink, and the events behind the counters that only appear
//!   when something happens: a session ending, a reload, a refused client, a stream
//!   relay-inner refuses, a failed handshake, a full admin endpoint, a sink failure);
//!   and a real Prometheus scraping both relays gets data for every query of the
//!   dashboard and evaluates every rule without error.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use routy_e2e::cdc::{CdcRig, RigOpts, CATCH_UP};
use routy_e2e::relays::{admin_request, READY};
use routy_e2e::{free_port, psql_at, require_root, run_timeout, try_wait_until, Proc};
use routy_ops::metrics as m;
use serde_json::Value;

const DASHBOARD: &str = "deploy/grafana/routy.json";
const ALERTS: &str = "deploy/prometheus/alerts.yml";
const ALERTS_TEST: &str = "deploy/prometheus/alerts_test.yml";

/// The repository's root.
fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ has a parent")
        .to_path_buf()
}

fn read(rel: &str) -> String {
    let path = repo().join(rel);
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
}

fn dashboard() -> Value {
    serde_json::from_str(&read(DASHBOARD)).unwrap_or_else(|e| panic!("{DASHBOARD}: {e}"))
}

/// Every panel, rows' nested panels included (a collapsed row holds its panels).
fn panels(d: &Value) -> Vec<&Value> {
    let mut out = Vec::new();
    for p in d["panels"].as_array().expect("panels is a list") {
        out.push(p);
        if let Some(inner) = p["panels"].as_array() {
            out.extend(inner);
        }
    }
    out
}

/// Every PromQL expression of the dashboard, with where it is: the panels' targets and
/// the template variables' queries.
fn dashboard_exprs(d: &Value) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for p in panels(d) {
        for t in p["targets"].as_array().into_iter().flatten() {
            if let Some(e) = t["expr"].as_str() {
                let at = format!(
                    "panel {:?} target {}",
                    p["title"].as_str().unwrap_or(""),
                    t["refId"].as_str().unwrap_or("?")
                );
                out.push((at, e.to_string()));
            }
        }
    }
    for v in d["templating"]["list"].as_array().into_iter().flatten() {
        if v["type"] != "query" {
            continue;
        }
        let at = format!("variable {}", v["name"]);
        let query = match &v["query"] {
            Value::String(s) => Some(s.as_str()),
            q => q["query"].as_str(),
        };
        out.extend(query.map(|q| (at.clone(), q.to_string())));
        out.extend(v["definition"].as_str().map(|q| (at, q.to_string())));
    }
    out
}

/// Every rule's `expr` in a rules file, with its alert's name. The file is YAML; this
/// reads the `expr:` keys, on one line or as a block (`>-`, `|`) of deeper lines.
fn rule_exprs(yaml: &str) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let mut alert = String::new();
    let lines: Vec<&str> = yaml.lines().collect();
    let mut i = 0;
    while i < lines.len() {
        let line = lines[i];
        let trimmed = line.trim_start();
        let indent = line.len() - trimmed.len();
        i += 1;
        if let Some(name) = trimmed
            .strip_prefix("- alert:")
            .or_else(|| trimmed.strip_prefix("- record:"))
        {
            alert = name.trim().to_string();
            continue;
        }
        let Some(rest) = trimmed.strip_prefix("expr:") else {
            continue;
        };
        let rest = rest.trim();
        let expr = if rest.starts_with('>') || rest.starts_with('|') {
            let mut parts = Vec::new();
            while i < lines.len() {
                let l = lines[i];
                let deeper = l.len() - l.trim_start().len() > indent;
                if !l.trim().is_empty() && !deeper {
                    break;
                }
                parts.push(l.trim());
                i += 1;
            }
            parts.join(" ")
        } else {
            rest.trim_matches(|c| c == '"' || c == '\'').to_string()
        };
        out.push((format!("alert {alert}"), expr));
    }
    out
}

/// The Routy metric names an expression uses; a histogram's `_bucket`, `_sum` and
/// `_count` series count as the histogram.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut rest = expr;
    while let Some(at) = rest.find("routy_") {
        let before = rest[..at].chars().next_back();
        let tail = &rest[at..];
        let len = tail
            .find(|c: char| !(c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_'))
            .unwrap_or(tail.len());
        if !before.is_some_and(|c| c.is_ascii_alphanumeric() || c == '_' || c == ':') {
            out.insert(histogram_base(&tail[..len]).to_string());
        }
        rest = &tail[len..];
    }
    out
}

fn histogram_base(name: &str) -> &str {
    ["_bucket", "_sum", "_count"]
        .iter()
        .find_map(|s| name.strip_suffix(s))
        .unwrap_or(name)
}

/// `expr` with Grafana's variables replaced: `$__rate_interval` and the other interval
/// variables by `1m`, every other `$var` or `${var}` by `.*` (what "All" selects).
fn substitute(expr: &str) -> String {
    let mut out = String::new();
    let mut chars = expr.chars().peekable();
    while let Some(c) = chars.next() {
        if c != '$' {
            out.push(c);
            continue;
        }
        let braced = chars.peek() == Some(&'{');
        if braced {
            chars.next();
        }
        let mut name = String::new();
        while let Some(&c) = chars.peek() {
            if c.is_ascii_alphanumeric() || c == '_' {
                name.push(c);
                chars.next();
            } else {
                break;
            }
        }
        if braced {
            assert_eq!(chars.next(), Some('}'), "unclosed ${{ in {expr:?}");
        }
        out.push_str(if name.starts_with("__") { "1m" } else { ".*" });
    }
    out
}

/// The variables an expression uses (`$x`, `${x}`), built-ins (`$__...`) left out.
fn variables(expr: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for part in expr.split('$').skip(1) {
        let name: String = part
            .trim_start_matches('{')
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        if !name.starts_with("__") {
            out.insert(name);
        }
    }
    out
}

/// The dashboard as Grafana needs it.
#[test]
fn the_dashboard_is_well_formed_for_grafana() {
    let d = dashboard();
    let mut problems = Vec::new();
    let schema = d["schemaVersion"].as_u64().unwrap_or(0);
    if !(36..=41).contains(&schema) {
        problems.push(format!("schemaVersion {schema}: expected 36 to 41"));
    }
    for key in ["title", "uid"] {
        if d[key].as_str().is_none_or(str::is_empty) {
            problems.push(format!("no {key}"));
        }
    }
    let vars = d["templating"]["list"]
        .as_array()
        .cloned()
        .unwrap_or_default();
    let defined: BTreeSet<String> = vars
        .iter()
        .filter_map(|v| v["name"].as_str().map(str::to_owned))
        .collect();
    match vars.iter().find(|v| v["name"] == "datasource") {
        Some(v) if v["type"] == "datasource" && v["query"] == "prometheus" => {}
        _ => problems.push("no `datasource` variable of type datasource for prometheus".into()),
    }
    for v in vars.iter().filter(|v| v["type"] == "query") {
        if v["datasource"]["uid"] != "${datasource}" {
            problems.push(format!(
                "variable {} does not query ${{datasource}}",
                v["name"]
            ));
        }
    }

    let mut ids = BTreeMap::new();
    let mut boxes: Vec<(String, [u64; 4])> = Vec::new();
    for p in panels(&d) {
        let title = p["title"].as_str().unwrap_or("").to_string();
        let what = format!("panel {title:?}");
        match p["id"].as_u64() {
            None => problems.push(format!("{what}: no numeric id")),
            Some(id) => {
                if let Some(other) = ids.insert(id, title.clone()) {
                    problems.push(format!("{what}: id {id} is also {other:?}'s"));
                }
            }
        }
        if title.is_empty() {
            problems.push(format!("panel {}: no title", p["id"]));
        }
        let g = &p["gridPos"];
        let cell = |k: &str| g[k].as_u64();
        match (cell("h"), cell("w"), cell("x"), cell("y")) {
            (Some(h), Some(w), Some(x), Some(y)) if h > 0 && w > 0 && x + w <= 24 => {
                boxes.push((title.clone(), [x, y, w, h]));
            }
            _ => problems.push(format!(
                "{what}: gridPos {g} is not h, w, x, y within 24 columns"
            )),
        }
        // A row only groups panels: it has no query and needs no data source.
        if p["type"] == "row" {
            continue;
        }
        if p["type"].as_str().is_none_or(str::is_empty) {
            problems.push(format!("{what}: no type"));
        }
        if p["datasource"]["uid"] != "${datasource}" {
            problems.push(format!(
                "{what}: datasource {} is not the ${{datasource}} variable",
                p["datasource"]
            ));
        }
        if p["description"].as_str().is_none_or(|s| s.len() < 20) {
            problems.push(format!("{what}: no description"));
        }
        if p["fieldConfig"]["defaults"]["unit"].as_str().is_none() && p["type"] != "state-timeline"
        {
            problems.push(format!("{what}: no unit"));
        }
        let targets = p["targets"].as_array().cloned().unwrap_or_default();
        if targets.is_empty() {
            problems.push(format!("{what}: no targets"));
        }
        let mut ref_ids = BTreeSet::new();
        for t in &targets {
            match t["refId"].as_str() {
                Some(r) if !r.is_empty() => {
                    if !ref_ids.insert(r.to_string()) {
                        problems.push(format!("{what}: refId {r} twice"));
                    }
                }
                _ => problems.push(format!("{what}: a target without refId: {t}")),
            }
            if t["expr"].as_str().is_none_or(|e| e.trim().is_empty()) {
                problems.push(format!("{what}: target {} has no expr", t["refId"]));
            }
            if !t["datasource"].is_null() && t["datasource"]["uid"] != "${datasource}" {
                problems.push(format!(
                    "{what}: target {} has another datasource",
                    t["refId"]
                ));
            }
        }
    }
    // Panels side by side, not on top of each other (Grafana would push them around).
    for (i, (a, [ax, ay, aw, ah])) in boxes.iter().enumerate() {
        for (b, [bx, by, bw, bh]) in &boxes[i + 1..] {
            if ax < &(bx + bw) && bx < &(ax + aw) && ay < &(by + bh) && by < &(ay + ah) {
                problems.push(format!("panels {a:?} and {b:?} overlap"));
            }
        }
    }
    let exprs = dashboard_exprs(&d);
    for (at, e) in &exprs {
        for v in variables(e) {
            if !defined.contains(&v) {
                problems.push(format!("{at}: ${v} is not a template variable"));
            }
        }
        if metric_names(e).is_empty() {
            problems.push(format!("{at}: uses no routy_ metric: {e}"));
        }
    }
    assert!(
        problems.is_empty(),
        "{DASHBOARD}:\n  {}",
        problems.join("\n  ")
    );
    eprintln!(
        "{} panels, {} queries, {} metrics",
        ids.len(),
        exprs.len(),
        exprs
            .iter()
            .flat_map(|(_, e)| metric_names(e))
            .collect::<BTreeSet<_>>()
            .len()
    );
}

/// Runs promtool with `args` from the repository's root; panics with its output unless
/// it succeeds.
fn promtool(args: &[&str]) -> String {
    let mut cmd = Command::new("promtool");
    cmd.args(args).current_dir(repo());
    let out = run_timeout(&mut cmd, None, Duration::from_secs(120)).unwrap_or_else(|e| {
        panic!("promtool {args:?}: {e} (promtool is in Debian's prometheus package: tests/install-deps)")
    });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?} failed:\n{text}");
    text
}

/// promtool accepts the rules and their unit tests pass; every query of the dashboard
/// (its variables replaced) is valid PromQL.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "needs promtool (tests/install-deps) and ROUTY_E2E=1; run tests/run"
)]
fn promtool_accepts_the_rules_and_their_tests_pass() {
    eprint!("{}", promtool(&["check", "rules", "--lint-fatal", ALERTS]));
    eprint!("{}", promtool(&["test", "rules", ALERTS_TEST]));
    // The dashboard's queries as recording rules, for promtool's parser.
    let dir = routy_e2e::tempdir();
    let mut rules = String::from("groups:\n  - name: dashboard\n    rules:\n");
    for (i, (at, e)) in dashboard_exprs(&dashboard()).iter().enumerate() {
        let e = substitute(e);
        if e.starts_with("label_values(") {
            continue; // Grafana's, not PromQL: its inner selector is checked below.
        }
        rules.push_str(&format!(
            "      # {at}\n      - record: dashboard:query{i}\n        expr: {}\n",
            serde_json::to_string(&e).unwrap()
        ));
    }
    for (i, (at, e)) in dashboard_exprs(&dashboard()).iter().enumerate() {
        if let Some(inner) = e.strip_prefix("label_values(") {
            let selector = inner.rsplit_once(',').map_or(inner, |(s, _)| s);
            rules.push_str(&format!(
                "      # {at}\n      - record: dashboard:variable{i}\n        expr: {}\n",
                serde_json::to_string(&substitute(selector)).unwrap()
            ));
        }
    }
    let file = dir.path().join("dashboard-queries.yml");
    std::fs::write(&file, &rules).unwrap();
    eprint!(
        "{}",
        promtool(&[
            "check",
            "rules",
            "--lint-fatal",
            file.to_str().expect("utf-8 path")
        ])
    );
}

/// Names of the metrics a Prometheus text page has samples of (histograms by their
/// own name as well as their series').
fn exported(page: &str) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    for line in page.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let name = line
            .split(|c: char| c == '{' || c.is_whitespace())
            .next()
            .unwrap_or("");
        out.insert(name.to_string());
        out.insert(histogram_base(name).to_string());
    }
    out
}

/// Connects to 127.0.0.1:`port`, sends a few bytes and waits until the peer closes (a
/// refused client, a refused stream); gives up after 10 s.
fn poke(port: u16) {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut t = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = t.write_all(b"hello\r\n");
    let mut buf = [0u8; 256];
    while matches!(t.read(&mut buf), Ok(n) if n > 0) {}
}

/// Percent-encodes a URL query value.
fn urlencode(s: &str) -> String {
    s.bytes()
        .map(|b| match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' => {
                (b as char).to_string()
            }
            _ => format!("%{b:02X}"),
        })
        .collect()
}

/// A Prometheus scraping both relays every second, with the alert rules loaded.
struct Prometheus {
    proc: Proc,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(targets: &[u16]) -> Prometheus {
        let dir = routy_e2e::tempdir();
        let port = free_port();
        let targets: Vec<String> = targets
            .iter()
            .map(|p| format!("\"127.0.0.1:{p}\""))
            .collect();
        let config = format!(
            "global: {{ scrape_interval: 1s, evaluation_interval: 1s }}\n\
             rule_files: [\"{}\"]\n\
             scrape_configs:\n  - job_name: routy\n    static_configs:\n      - targets: [{}]\n",
            repo().join(ALERTS).display(),
            targets.join(", ")
        );
        let file = dir.path().join("prometheus.yml");
        std::fs::write(&file, config).unwrap();
        let mut cmd = Command::new("prometheus");
        cmd.arg(format!("--config.file={}", file.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .arg("--log.level=warn");
        let proc = Proc::spawn("prometheus", cmd);
        let p = Prometheus {
            proc,
            port,
            _dir: dir,
        };
        let up = try_wait_until(READY, "Prometheus ready", || {
            matches!(admin_request(port, "GET", "/-/ready", None), Ok((200, _)))
        });
        up.unwrap_or_else(|e| panic!("{e}\n{}", p.proc.log()));
        p
    }

    /// `GET path` on the HTTP API; the JSON answer.
    fn get(&self, path: &str) -> Result<Value, String> {
        let (status, body) = admin_request(self.port, "GET", path, None)?;
        let v: Value = serde_json::from_str(&body).map_err(|e| format!("{e}: {body}"))?;
        if status != 200 || v["status"] != "success" {
            return Err(format!("{status}: {body}"));
        }
        Ok(v)
    }

    /// How many series an instant query returns, or its error.
    fn query(&self, expr: &str) -> Result<usize, String> {
        let v = self.get(&format!("/api/v1/query?query={}", urlencode(expr)))?;
        Ok(v["data"]["result"].as_array().map_or(0, Vec::len))
    }
}

/// A real relay-outer and relay-inner export every metric the dashboard and the alert
/// rules use, and a real Prometheus gets data for every query of the dashboard and
/// evaluates every rule without error.
#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn every_metric_the_dashboard_and_alerts_use_is_exported() {
    require_root();
    let started = Instant::now();
    let d = dashboard();
    let mut wanted: BTreeMap<String, BTreeSet<String>> = BTreeMap::new();
    for (at, e) in dashboard_exprs(&d) {
        for n in metric_names(&e) {
            wanted
                .entry(n)
                .or_default()
                .insert(format!("{DASHBOARD} {at}"));
        }
    }
    for (at, e) in rule_exprs(&read(ALERTS)) {
        for n in metric_names(&e) {
            wanted
                .entry(n)
                .or_default()
                .insert(format!("{ALERTS} {at}"));
        }
    }
    assert!(wanted.len() > 30, "too few metrics found: {wanted:?}");

    // relay-outer with a listener `pg` through tunnel site-a to relay-inner's PostgreSQL
    // (the CDC source), and a PostgreSQL sink whose table refuses v = 'bad' at first.
    let mut rig = CdcRig::start(RigOpts {
        setup_sql: "CREATE TABLE public.t (id int PRIMARY KEY, v text);
                    INSERT INTO public.t VALUES (1, 'a');"
            .into(),
        target_setup_sql: "CREATE TABLE public.t (id int PRIMARY KEY, v text CHECK (v <> 'bad'));"
            .into(),
        tables: vec!["public.t".into()],
        ..RigOpts::default()
    });
    let admin = |r: &routy_e2e::relays::Relay| r.admin_port.expect("admin port");
    let prometheus = Prometheus::start(&[admin(rig.outer()), admin(rig.inner())]);
    rig.wait_in_sync(&["public.t"], CATCH_UP);
    eprintln!("{:?}: rig up, snapshot applied", started.elapsed());

    // A session ends (relay-inner killed) and another comes up.
    let ended = rig.outer().metric(m::SESSION_DISCONNECTS, &[]);
    let connects = rig.outer().metric(m::SESSION_CONNECTS, &[]);
    rig.kill_inner();
    rig.outer()
        .wait_metric(m::SESSION_DISCONNECTS, &[], READY, |v| v > ended);
    rig.start_inner();
    rig.outer()
        .wait_metric(m::SESSION_CONNECTS, &[], READY, |v| v > connects);
    rig.outer()
        .wait_metric(m::SESSIONS_UP, &[], READY, |v| v >= 1.0);

    // A reload adds two listeners: `orphan` for tunnel site-b, which has no session, and
    // `nosvc` for a service relay-inner does not have.
    let (orphan, nosvc) = (free_port(), free_port());
    let yaml = rig.outer_yaml.replacen(
        "listeners:\n",
        &format!(
            "listeners:\n  - name: orphan\n    bind: \"127.0.0.1:{orphan}\"\n    tunnel: site-b\n    service: pg\n  - name: nosvc\n    bind: \"127.0.0.1:{nosvc}\"\n    tunnel: site-a\n    service: nope\n"
        ),
        1,
    );
    std::fs::write(&rig.outer().config, yaml).unwrap();
    rig.outer
        .as_mut()
        .expect("relay-outer runs")
        .proc
        .signal(libc::SIGHUP);
    rig.outer()
        .wait_metric(m::CONFIG_RELOADS, &[("result", "ok")], READY, |v| v >= 1.0);

    // A client through the tunnel; a client refused (no session); a stream relay-inner
    // refuses (unknown service).
    psql_at("127.0.0.1", rig.listen_port, "SELECT 1").expect("SQL through the tunnel");
    poke(orphan);
    poke(nosvc);
    rig.outer().wait_metric(
        m::LISTENER_REFUSED,
        &[("reason", "no_session")],
        READY,
        |v| v >= 1.0,
    );
    rig.outer()
        .wait_metric(m::STREAMS_FAILED, &[("listener", "nosvc")], READY, |v| {
            v >= 1.0
        });

    // A tunnel handshake that fails: bytes that are not TLS.
    let mut t = TcpStream::connect_timeout(&rig.tunnel_addr, Duration::from_secs(5)).unwrap();
    t.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let _ = t.write_all(&[0u8; 64]);
    let _ = t.read(&mut [0u8; 64]);
    drop(t);
    rig.outer()
        .wait_metric(m::HANDSHAKE_FAILURES, &[], READY, |v| v >= 1.0);

    // relay-outer's admin endpoint full: 40 silent connections from one address (32 at
    // most), one of which is closed to make room.
    let addr = SocketAddr::from(([127, 0, 0, 1], admin(rig.outer())));
    let silent: Vec<TcpStream> = (0..40)
        .filter_map(|_| TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok())
        .collect();
    rig.outer()
        .wait_metric(m::HTTP_SHED, &[("reason", "made_room")], READY, |v| {
            v >= 1.0
        });
    drop(silent);

    // A sink failure: a row the target's CHECK refuses, until the constraint goes.
    rig.source.psql("INSERT INTO public.t VALUES (2, 'bad')");
    rig.outer()
        .wait_metric("routy_cdc_sink_errors_total", &[], CATCH_UP, |v| v >= 1.0);
    rig.target
        .psql("ALTER TABLE public.t DROP CONSTRAINT t_v_check");
    rig.source.psql("INSERT INTO public.t VALUES (3, 'c')");
    rig.wait_in_sync(&["public.t"], CATCH_UP);
    eprintln!("{:?}: events done", started.elapsed());

    // Every metric the dashboard and the rules use, on one relay or the other. Some
    // gauges are refreshed every few seconds (the spool's every 5 s): wait a little.
    let mut missing = Vec::new();
    let all_there = try_wait_until(Duration::from_secs(20), "every metric exported", || {
        let mut have = BTreeSet::new();
        for r in [rig.outer(), rig.inner()] {
            if let Ok(page) = r.try_admin_get("/metrics") {
                have.extend(exported(&page));
            }
        }
        missing = wanted
            .iter()
            .filter(|(name, _)| !have.contains(name.as_str()))
            .map(|(name, users)| {
                format!(
                    "{name} (used by {})",
                    users.iter().cloned().collect::<Vec<_>>().join("; ")
                )
            })
            .collect();
        missing.is_empty()
    });
    if all_there.is_err() {
        panic!(
            "{} metric(s) the dashboard or the alert rules use are not exported by relay-outer or relay-inner:\n  {}\n--- relay-outer /metrics ---\n{}\n--- relay-inner /metrics ---\n{}",
            missing.len(),
            missing.join("\n  "),
            rig.outer().try_admin_get("/metrics").unwrap_or_default(),
            rig.inner().try_admin_get("/metrics").unwrap_or_default(),
        );
    }
    eprintln!(
        "{:?}: the {} metrics the dashboard and the rules use are exported",
        started.elapsed(),
        wanted.len()
    );

    // Prometheus: every dashboard query has data, every rule evaluates without error.
    let queries: Vec<(String, String)> = dashboard_exprs(&d)
        .into_iter()
        .filter(|(_, e)| !e.starts_with("label_values("))
        .map(|(at, e)| (at, substitute(&e)))
        .collect();
    let mut empty = Vec::new();
    let answered = try_wait_until(
        Duration::from_secs(30),
        "every dashboard query has data",
        || {
            empty = queries
                .iter()
                .filter_map(|(at, e)| match prometheus.query(e) {
                    Ok(n) if n > 0 => None,
                    Ok(_) => Some(format!("{at}: no data: {e}")),
                    Err(err) => Some(format!("{at}: {err}: {e}")),
                })
                .collect();
            empty.is_empty()
        },
    );
    if answered.is_err() {
        panic!(
            "dashboard queries without data from the real relays:\n  {}\n--- prometheus log ---\n{}",
            empty.join("\n  "),
            prometheus.proc.log()
        );
    }
    let mut unhealthy = Vec::new();
    let healthy = try_wait_until(Duration::from_secs(20), "every rule evaluated", || {
        let Ok(v) = prometheus.get("/api/v1/rules") else {
            return false;
        };
        unhealthy = v["data"]["groups"]
            .as_array()
            .into_iter()
            .flatten()
            .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
            .filter(|r| r["health"] != "ok")
            .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
            .collect();
        unhealthy.is_empty()
    });
    if healthy.is_err() {
        panic!(
            "alert rules that do not evaluate:\n  {}",
            unhealthy.join("\n  ")
        );
    }
    eprintln!(
        "{:?}: {} dashboard queries have data; the rules evaluate",
        started.elapsed(),
        queries.len()
    );
}

#[test]
fn metric_names_and_rule_exprs_are_read_as_meant() {
    assert_eq!(
        metric_names(
            "histogram_quantile(0.9, sum by (le) (rate(routy_stream_open_seconds_bucket{a=\"b\"}[5m]))) / routy_cdc_spool_max_bytes + my_routy_thing + routy_x_count"
        ),
        ["routy_cdc_spool_max_bytes", "routy_stream_open_seconds", "routy_x"]
            .map(String::from)
            .into()
    );
    let yaml = "groups:\n  - name: g\n    rules:\n      - alert: A\n        expr: up == 0\n        for: 1m\n      - alert: B\n        expr: >-\n          routy_a > 1\n          and routy_b\n        for: 2m\n";
    assert_eq!(
        rule_exprs(yaml),
        [
            ("alert A".to_string(), "up == 0".to_string()),
            ("alert B".to_string(), "routy_a > 1 and routy_b".to_string())
        ]
    );
    assert_eq!(
        substitute("rate(x{i=~\"$instance\", s=~\"${sink}\"}[$__rate_interval])"),
        "rate(x{i=~\".*\", s=~\".*\"}[1m])"
    );
    assert_eq!(
        variables("a{i=~\"$instance\"}[$__rate_interval] ${sink}"),
        ["instance", "sink"].map(String::from).into()
    );
}
