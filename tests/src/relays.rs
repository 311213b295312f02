//! Starting the real relays: certificates made by `relay-outer certs`, configs written
//! as YAML files, processes started (optionally inside a network namespace).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::{bin, netns_cmd, run_timeout, Proc};

/// How long a relay may take to come up in a test.
pub const READY: Duration = Duration::from_secs(30);

/// A directory with a CA, relay-outer's certificate and client certificates.
pub struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    /// Runs `relay-outer certs init` for these server names.
    pub fn new(server_names: &[&str]) -> Pki {
        let dir = crate::tempdir();
        let mut cmd = Command::new(bin("relay-outer"));
        cmd.args(["certs", "init", "--dir"]).arg(dir.path());
        for n in server_names {
            cmd.args(["--server-name", n]);
        }
        let out = run_timeout(&mut cmd, None, Duration::from_secs(30)).expect("certs init");
        assert!(
            out.status.success(),
            "certs init failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        Pki { dir }
    }

    /// Runs `relay-outer certs issue --tunnel NAME`.
    pub fn issue(&self, tunnel: &str) {
        let mut cmd = Command::new(bin("relay-outer"));
        cmd.args(["certs", "issue", "--dir"])
            .arg(self.dir.path())
            .args(["--tunnel", tunnel]);
        let out = run_timeout(&mut cmd, None, Duration::from_secs(30)).expect("certs issue");
        assert!(
            out.status.success(),
            "certs issue failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// A file in the PKI directory.
    pub fn path(&self, file: &str) -> PathBuf {
        self.dir.path().join(file)
    }

    /// The PKI directory.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

/// One listener in relay-outer's config.
#[derive(Clone, Debug)]
pub struct ListenerSpec {
    /// Listener name.
    pub name: String,
    /// `addr:port` to bind.
    pub bind: String,
    /// Tunnel name.
    pub tunnel: String,
    /// Service name.
    pub service: String,
    /// Extra YAML lines for this listener (indented by the caller, e.g. `    max_connections: 2`).
    pub extra: String,
}

impl ListenerSpec {
    /// A listener with no extras.
    pub fn new(name: &str, bind: &str, tunnel: &str, service: &str) -> Self {
        ListenerSpec {
            name: name.into(),
            bind: bind.into(),
            tunnel: tunnel.into(),
            service: service.into(),
            extra: String::new(),
        }
    }
}

/// relay-outer's config as YAML; `extra` is appended at the top level.
pub fn outer_yaml(
    pki: &Pki,
    listen: &str,
    keepalive: (&str, &str),
    listeners: &[ListenerSpec],
    extra: &str,
) -> String {
    let mut y = format!(
        "tunnel:\n  listen: \"{listen}\"\n  tls: {{ cert: {}, key: {}, client_ca: {} }}\n  keepalive: {{ interval: {}, timeout: {} }}\nlisteners:\n",
        pki.path("outer.crt").display(),
        pki.path("outer.key").display(),
        pki.path("ca.crt").display(),
        keepalive.0,
        keepalive.1,
    );
    for l in listeners {
        y.push_str(&format!(
            "  - name: {}\n    bind: \"{}\"\n    tunnel: {}\n    service: {}\n",
            l.name, l.bind, l.tunnel, l.service
        ));
        if !l.extra.is_empty() {
            y.push_str(&l.extra);
            if !l.extra.ends_with('\n') {
                y.push('\n');
            }
        }
    }
    y.push_str(extra);
    with_admin(y, extra)
}

/// Adds an admin endpoint on a free loopback port unless `extra` configures one.
fn with_admin(mut y: String, extra: &str) -> String {
    if !extra.contains("admin:") {
        y.push_str(&format!(
            "\nadmin: {{ listen: \"127.0.0.1:{}\" }}\n",
            crate::free_port()
        ));
    }
    y
}

/// relay-inner's config as YAML for tunnel `tunnel` (its certificate must be issued),
/// dialing `outers` (`addr`, `server_name`) and exposing `services` (`name`, `target`).
pub fn inner_yaml(
    pki: &Pki,
    tunnel: &str,
    outers: &[(String, &str)],
    services: &[(&str, String)],
    keepalive: (&str, &str),
    extra: &str,
) -> String {
    let mut y = String::from("outer:\n");
    for (addr, name) in outers {
        y.push_str(&format!(
            "  - {{ addr: \"{addr}\", server_name: \"{name}\" }}\n"
        ));
    }
    y.push_str(&format!(
        "tls: {{ cert: {}, key: {}, ca: {} }}\nreconnect: {{ initial: 50ms, max: 1s }}\nkeepalive: {{ interval: {}, timeout: {} }}\nservices:\n",
        pki.path(&format!("{tunnel}.crt")).display(),
        pki.path(&format!("{tunnel}.key")).display(),
        pki.path("ca.crt").display(),
        keepalive.0,
        keepalive.1,
    ));
    for (name, target) in services {
        y.push_str(&format!(
            "  {name}: {{ target: \"{target}\", connect_timeout: 3s }}\n"
        ));
    }
    y.push_str(extra);
    with_admin(y, extra)
}

/// A running relay with its config file.
pub struct Relay {
    /// The process.
    pub proc: Proc,
    /// Its config file.
    pub config: PathBuf,
    /// Port of its admin endpoint on 127.0.0.1, if the config names one.
    pub admin_port: Option<u16>,
    /// The token [`Relay::admin_get`] sends, for an endpoint with `admin.tokens`.
    pub admin_token: Option<String>,
    netns: Option<String>,
    _dir: tempfile::TempDir,
}

impl Relay {
    /// Writes `yaml` to a file and starts `relay-outer run` or `relay-inner run` with it
    /// (inside `netns` if given), at debug log level for our crates.
    pub fn start(which: &str, name: &str, yaml: &str, netns: Option<&str>) -> Relay {
        Relay::start_env(which, name, yaml, netns, &[])
    }

    /// [`Relay::start`] with environment variables set. The proxy variables
    /// (`HTTPS_PROXY` and the like) of the test's own environment are never passed on:
    /// a relay sees only those in `env`.
    pub fn start_env(
        which: &str,
        name: &str,
        yaml: &str,
        netns: Option<&str>,
        env: &[(String, String)],
    ) -> Relay {
        let dir = crate::tempdir();
        let config = dir.path().join(format!("{which}.yaml"));
        std::fs::write(&config, yaml).expect("write config");
        let mut cmd = match netns {
            Some(ns) => {
                let mut c = netns_cmd(ns, bin(which));
                c.arg("run");
                c
            }
            None => {
                let mut c = Command::new(bin(which));
                c.arg("run");
                c
            }
        };
        cmd.arg("--config")
            .arg(&config)
            .args(["--log-level", "info,relay_outer=debug,relay_inner=debug"]);
        for v in [
            "https_proxy",
            "HTTPS_PROXY",
            "all_proxy",
            "ALL_PROXY",
            "no_proxy",
            "NO_PROXY",
        ] {
            cmd.env_remove(v);
        }
        cmd.envs(env.iter().map(|(k, v)| (k, v)));
        let admin_port = yaml
            .split("admin: { listen: \"127.0.0.1:")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .and_then(|p| p.parse().ok());
        Relay {
            proc: Proc::spawn(name, cmd),
            config,
            admin_port,
            admin_token: None,
            netns: netns.map(str::to_owned),
            _dir: dir,
        }
    }

    /// Starts relay-outer and waits until its ports are bound.
    pub fn outer(yaml: &str, netns: Option<&str>) -> Relay {
        let r = Relay::start("relay-outer", "relay-outer", yaml, netns);
        r.proc.wait_for_log("tunnel port ready", READY);
        r
    }

    /// Starts relay-inner and waits until a tunnel is up.
    pub fn inner(name: &str, yaml: &str, netns: Option<&str>) -> Relay {
        let r = Relay::start("relay-inner", name, yaml, netns);
        r.proc.wait_for_log("tunnel up", READY);
        r
    }

    /// The pair of a firewall test: relay-outer in `pair`'s outside namespace with listener
    /// `pg` on `outside_ip:listen_port` (tunnel `site-a`, service `pg`), relay-inner inside
    /// exposing `pg` as `inside_ip:pg_port` and dialing `outside_ip:tunnel_port`; relay-inner
    /// gets `inner_extra` on top of `shutdown_grace`.
    pub fn across(
        pair: &crate::NetPair,
        pki: &Pki,
        (tunnel_port, listen_port, pg_port): (u16, u16, u16),
        keepalive: (&str, &str),
        inner_extra: &str,
    ) -> (Relay, Relay) {
        let (inside_ip, outside_ip) = (pair.inside_ip(), pair.outside_ip());
        let listener =
            ListenerSpec::new("pg", &format!("{outside_ip}:{listen_port}"), "site-a", "pg");
        let outer = Relay::outer(
            &outer_yaml(
                pki,
                &format!("{outside_ip}:{tunnel_port}"),
                keepalive,
                &[listener],
                "shutdown_grace: 2s\n",
            ),
            Some(pair.outside_ns()),
        );
        let inner = Relay::inner(
            "relay-inner",
            &inner_yaml(
                pki,
                "site-a",
                &[(format!("{outside_ip}:{tunnel_port}"), outside_ip)],
                &[("pg", format!("{inside_ip}:{pg_port}"))],
                keepalive,
                inner_extra,
            ),
            Some(pair.inside_ns()),
        );
        (outer, inner)
    }

    /// Number of times `needle` occurs in the log so far.
    pub fn count(&self, needle: &str) -> usize {
        self.proc.log().matches(needle).count()
    }

    /// GET `path` on the relay's admin endpoint (inside its namespace, if it runs in one);
    /// panics unless the answer is a 200.
    pub fn admin_get(&self, path: &str) -> String {
        self.try_admin_get(path)
            .unwrap_or_else(|e| panic!("{}: admin GET {path}: {e}", self.proc.name()))
    }

    /// GET `path` on the relay's admin endpoint: the body of a 200 answer, or why not
    /// (for polling a relay that may be restarting).
    pub fn try_admin_get(&self, path: &str) -> Result<String, String> {
        let port = self
            .admin_port
            .unwrap_or_else(|| panic!("{}: no admin endpoint configured", self.proc.name()));
        let get = {
            let path = path.to_owned();
            let token = self.admin_token.clone();
            move || http_get(port, &path, token.as_deref())
        };
        match &self.netns {
            Some(ns) => crate::in_netns(ns, get),
            None => get(),
        }
    }

    /// The relay's `/status` document, or `Null` while it does not answer.
    pub fn try_status(&self) -> serde_json::Value {
        self.try_admin_get("/status")
            .ok()
            .and_then(|b| serde_json::from_str(&b).ok())
            .unwrap_or_default()
    }

    /// The relay's `/status` document.
    pub fn status(&self) -> serde_json::Value {
        let body = self.admin_get("/status");
        serde_json::from_str(&body)
            .unwrap_or_else(|e| panic!("{}: /status is not JSON ({e}): {body}", self.proc.name()))
    }

    /// Sum of the samples of Prometheus metric `name` whose labels include every pair of
    /// `labels`, from a fresh scrape of `/metrics`; 0 when no sample matches (a counter
    /// that never moved is not exported yet).
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        metric(&self.admin_get("/metrics"), name, labels)
    }

    /// Waits until `metric(name, labels)` satisfies `ok` (a relay that does not answer
    /// yet is waited for too); returns the last value.
    pub fn wait_metric(
        &self,
        name: &str,
        labels: &[(&str, &str)],
        timeout: Duration,
        ok: impl Fn(f64) -> bool,
    ) -> f64 {
        let mut last = 0.0;
        let what = format!("{name}{labels:?} to reach the expected value");
        let res = crate::try_wait_until(timeout, &what, || match self.try_admin_get("/metrics") {
            Ok(body) => {
                last = metric(&body, name, labels);
                ok(last)
            }
            Err(_) => false,
        });
        if let Err(e) = res {
            panic!(
                "{}: {e} (last {last})\n--- /metrics ---\n{}\n--- log ---\n{}",
                self.proc.name(),
                self.try_admin_get("/metrics").unwrap_or_else(|e| e),
                crate::tail(&self.proc.log(), 80)
            );
        }
        last
    }

    /// Waits until `ok` holds for the relay's `/status` (a relay that does not answer
    /// yet, just started, is waited for too); returns that document.
    pub fn wait_status(
        &self,
        what: &str,
        timeout: Duration,
        ok: impl Fn(&serde_json::Value) -> bool,
    ) -> serde_json::Value {
        let mut last = serde_json::Value::Null;
        let res = crate::try_wait_until(timeout, what, || {
            last = self.try_status();
            !last.is_null() && ok(&last)
        });
        if let Err(e) = res {
            panic!(
                "{}: {e}\n--- /status ---\n{last}\n--- log ---\n{}",
                self.proc.name(),
                crate::tail(&self.proc.log(), 80)
            );
        }
        last
    }

    /// Tunnel sessions this relay has seen come up so far
    /// (`routy_session_connects_total`, all labels).
    pub fn sessions_up(&self) -> u64 {
        self.metric(routy_ops::metrics::SESSION_CONNECTS, &[]) as u64
    }

    /// Tunnel sessions this relay has seen end so far, whose `reason` label is `reason`
    /// when given (`routy_session_disconnects_total`).
    pub fn sessions_down(&self, reason: Option<&str>) -> u64 {
        let labels: Vec<(&str, &str)> = reason.map(|r| ("reason", r)).into_iter().collect();
        self.metric(routy_ops::metrics::SESSION_DISCONNECTS, &labels) as u64
    }

    /// Waits until at least `n` sessions came up; returns how long that took.
    pub fn wait_sessions_up(&self, n: u64, timeout: Duration) -> Duration {
        let start = std::time::Instant::now();
        let name = routy_ops::metrics::SESSION_CONNECTS;
        self.wait_metric(name, &[], timeout, |v| v >= n as f64);
        start.elapsed()
    }

    /// Waits until at least `n` sessions ended; returns how long that took.
    pub fn wait_sessions_down(&self, n: u64, timeout: Duration) -> Duration {
        let start = std::time::Instant::now();
        let name = routy_ops::metrics::SESSION_DISCONNECTS;
        self.wait_metric(name, &[], timeout, |v| v >= n as f64);
        start.elapsed()
    }

    /// Waits until `needle` occurs at least `n` times in the log.
    pub fn wait_count(&self, needle: &str, n: usize, timeout: Duration) {
        let ok = crate::try_wait_until(timeout, needle, || self.count(needle) >= n);
        if let Err(e) = ok {
            panic!(
                "{e}\n--- {} log ---\n{}",
                self.proc.name(),
                crate::tail(&self.proc.log(), 80)
            );
        }
    }
}

/// Runs `relay-outer|relay-inner check-config --config FILE` on `yaml` and returns
/// (success, stdout + stderr).
pub fn check_config(which: &str, yaml: &str) -> (bool, String) {
    let dir = crate::tempdir();
    let config = dir.path().join("c.yaml");
    std::fs::write(&config, yaml).expect("write config");
    check_config_file(which, &config)
}

/// Runs `check-config` on an existing (or missing) file.
pub fn check_config_file(which: &str, config: &Path) -> (bool, String) {
    let mut cmd = Command::new(bin(which));
    cmd.args(["check-config", "--config"]).arg(config);
    let out = run_timeout(&mut cmd, None, Duration::from_secs(30)).expect("check-config");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// The common end-to-end setup on loopback: a PostgreSQL, certificates for `localhost`
/// and `127.0.0.1` with tunnel `site-a`, relay-outer with one listener `pg` (tunnel
/// `site-a`, service `pg`) and a relay-inner exposing `pg` with a session up.
pub struct Tunnel {
    /// The database behind relay-inner.
    pub pg: crate::Pg,
    /// The certificates.
    pub pki: Pki,
    /// relay-outer.
    pub outer: Relay,
    /// relay-inner.
    pub inner: Relay,
    /// relay-outer's tunnel port.
    pub tunnel_port: u16,
    /// The listener's port.
    pub listen_port: u16,
}

impl Tunnel {
    /// Starts everything with this keepalive; `extra` is appended to both configs.
    pub fn start(keepalive: (&str, &str), extra: &str) -> Tunnel {
        let pg = crate::Pg::start(crate::PgOpts::default());
        let pki = Pki::new(&["localhost", "127.0.0.1"]);
        pki.issue("site-a");
        let tunnel_port = crate::free_port();
        let listen_port = crate::free_port();
        let l = ListenerSpec::new("pg", &format!("127.0.0.1:{listen_port}"), "site-a", "pg");
        let oy = outer_yaml(
            &pki,
            &format!("127.0.0.1:{tunnel_port}"),
            keepalive,
            &[l],
            extra,
        );
        let outer = Relay::outer(&oy, None);
        let iy = Tunnel::inner_cfg(&pki, "site-a", tunnel_port, &pg, keepalive, extra);
        let inner = Relay::inner("relay-inner", &iy, None);
        outer.wait_count("tunnel up", 1, READY);
        Tunnel {
            pg,
            pki,
            outer,
            inner,
            tunnel_port,
            listen_port,
        }
    }

    /// relay-inner's config for `tunnel`, dialing 127.0.0.1:`tunnel_port` and exposing
    /// `pg` as service `pg`.
    pub fn inner_cfg(
        pki: &Pki,
        tunnel: &str,
        tunnel_port: u16,
        pg: &crate::Pg,
        keepalive: (&str, &str),
        extra: &str,
    ) -> String {
        inner_yaml(
            pki,
            tunnel,
            &[(format!("127.0.0.1:{tunnel_port}"), "localhost")],
            &[("pg", format!("127.0.0.1:{}", pg.port()))],
            keepalive,
            extra,
        )
    }

    /// SQL through the listener, that is through the tunnel.
    pub fn sql(&self, sql: &str) -> Result<String, String> {
        crate::psql_at("127.0.0.1", self.listen_port, sql)
    }
}

/// One HTTP/1.0 GET to 127.0.0.1:`port`; the body of a 200 answer, or an error.
fn http_get(port: u16, path: &str, token: Option<&str>) -> Result<String, String> {
    match admin_request(port, "GET", path, token)? {
        (200, body) => Ok(body),
        (status, body) => Err(format!("answer {status}: {body}")),
    }
}

/// One request to an admin endpoint on 127.0.0.1:`port` (with `Authorization: Bearer`
/// when `token` is given): the status and the body.
pub fn admin_request(
    port: u16,
    method: &str,
    path: &str,
    token: Option<&str>,
) -> Result<(u16, String), String> {
    use std::io::{Read, Write};
    let addr = std::net::SocketAddr::from(([127, 0, 0, 1], port));
    let mut t = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    t.set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    t.write_all(
        format!("{method} {path} HTTP/1.0\r\nHost: 127.0.0.1\r\n{auth}Content-Length: 0\r\n\r\n")
            .as_bytes(),
    )
    .map_err(|e| format!("send: {e}"))?;
    let mut raw = String::new();
    t.read_to_string(&mut raw)
        .map_err(|e| format!("read: {e}"))?;
    let (head, body) = raw
        .split_once("\r\n\r\n")
        .ok_or_else(|| format!("no end of headers in {raw:?}"))?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("no status in {head:?}"))?;
    Ok((status, body.to_owned()))
}

/// Sum of the samples of metric `name` in Prometheus text `text` whose labels include
/// every pair of `want`; 0 when none matches.
pub fn metric(text: &str, name: &str, want: &[(&str, &str)]) -> f64 {
    metric_sample(text, name, want).unwrap_or(0.0)
}

/// Like [`metric`], but `None` when no sample matches (the metric is not exported).
pub fn metric_sample(text: &str, name: &str, want: &[(&str, &str)]) -> Option<f64> {
    let mut sum = None;
    for line in text.lines() {
        if line.starts_with('#') || line.trim().is_empty() {
            continue;
        }
        let Some((series, value)) = line.rsplit_once(' ') else {
            continue;
        };
        let (n, labels) = match series.split_once('{') {
            Some((n, l)) => (n, parse_labels(l.trim_end_matches('}'))),
            None => (series, BTreeMap::new()),
        };
        if n == name
            && want
                .iter()
                .all(|(k, v)| labels.get(*k).map(String::as_str) == Some(*v))
        {
            let v = value
                .trim()
                .parse::<f64>()
                .unwrap_or_else(|_| panic!("unparsable sample {line:?}"));
            sum = Some(sum.unwrap_or(0.0) + v);
        }
    }
    sum
}

/// Parses `k="v",k2="v2"` (the part between the braces of a Prometheus sample).
fn parse_labels(s: &str) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    let mut rest = s;
    while let Some((key, after)) = rest.split_once("=\"") {
        let mut value = String::new();
        let mut chars = after.char_indices();
        let mut end = after.len();
        while let Some((i, c)) = chars.next() {
            match c {
                '\\' => {
                    if let Some((_, n)) = chars.next() {
                        value.push(match n {
                            'n' => '\n',
                            other => other,
                        });
                    }
                }
                '"' => {
                    end = i + 1;
                    break;
                }
                c => value.push(c),
            }
        }
        out.insert(key.trim_start_matches(',').trim().to_string(), value);
        rest = &after[end..];
    }
    out
}
