//! Out of a network whose only way out is a proxy. The source PostgreSQL and relay-inner
//! are in an "inside" network namespace whose firewall lets it open connections to one
//! port only: the proxy's, in the "outside" namespace next to relay-outer. The proxies
//! are Debian's: tinyproxy (HTTP CONNECT, with and without a password), dante (SOCKS5)
//! and microsocks (SOCKS5 with a password).
//!
//! 1. Through tinyproxy with a password from a file: a streaming standby (pg_basebackup,
//!    then WAL) and CDC pass through the tunnel; the proxy is killed and started again and
//!    the tunnel heals by itself, CDC going on.
//! 2. A wrong password: refused with the proxy's answer (401) in the log, counted; the
//!    file fixed and the config reloaded, the tunnel comes up.
//! 3. The WebSocket transport through tinyproxy (no password): CDC passes.
//! 4. SOCKS5: a wrong password is named; the proxy from `ALL_PROXY` (the config's key
//!    removed by a reload) gets through microsocks; a reload to dante without
//!    credentials, and the next connection goes through dante.

use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use routy_e2e::cdc::{CdcRig, RigOpts};
use routy_e2e::{free_port, in_netns, psql_in, require_root, try_wait_until, NetPair, Proc};
use routy_e2e::{Pg, PgOpts};

/// Generous bound on the tunnel coming up or going down.
const WAIT: Duration = Duration::from_secs(60);

const SETUP_SQL: &str = "CREATE TABLE t (id int PRIMARY KEY, v text); \
     INSERT INTO t SELECT g, 'row ' || g FROM generate_series(1, 100) g;";

/// A CDC rig split over two namespaces, relay-inner not started yet.
fn rig(outer_entry_extra: &str, env: &[(&str, &str)]) -> CdcRig {
    rig_with(outer_entry_extra, env, "")
}

/// [`rig`] with extra top-level YAML for relay-inner.
fn rig_with(outer_entry_extra: &str, env: &[(&str, &str)], inner_extra: &str) -> CdcRig {
    CdcRig::start(RigOpts {
        inner_extra: inner_extra.into(),
        netns: true,
        setup_sql: SETUP_SQL.into(),
        tables: vec!["public.t".into()],
        outer_entry_extra: outer_entry_extra.into(),
        inner_env: env
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect(),
        defer_inner: true,
        ..RigOpts::default()
    })
}

fn pair(rig: &CdcRig) -> &NetPair {
    rig.pair.as_ref().expect("the rig runs in namespaces")
}

/// Lets the inside namespace open connections only to the outside address's `ports`.
fn only_through(pair: &NetPair, ports: &[u16]) {
    let ports: Vec<String> = ports.iter().map(u16::to_string).collect();
    pair.load_nft(&format!(
        "table inet proxyonly {{\n chain output {{\n  type filter hook output priority 0; policy drop;\n  \
         oifname \"lo\" accept\n  ct state established,related accept\n  \
         ip daddr {} tcp dport {{ {} }} accept\n }}\n}}\n",
        pair.outside_ip(),
        ports.join(", ")
    ));
}

/// Whether a TCP connection from the inside namespace to `addr` gets through.
fn inside_reaches(pair: &NetPair, addr: SocketAddr) -> bool {
    in_netns(pair.inside_ns(), move || {
        TcpStream::connect_timeout(&addr, Duration::from_secs(2)).is_ok()
    })
}

/// Waits until something listens on `port` at the outside address.
fn wait_listening(pair: &NetPair, port: u16, what: &str) {
    let addr: SocketAddr = format!("{}:{port}", pair.outside_ip()).parse().unwrap();
    let ns = pair.outside_ns().to_string();
    try_wait_until(Duration::from_secs(20), what, || {
        let ns = ns.clone();
        in_netns(&ns, move || {
            TcpStream::connect_timeout(&addr, Duration::from_secs(1)).is_ok()
        })
    })
    .unwrap();
}

/// tinyproxy on the outside address, allowing CONNECT to `tunnel_port` only, with
/// `user:password` when given.
fn tinyproxy(
    pair: &NetPair,
    dir: &std::path::Path,
    port: u16,
    tunnel_port: u16,
    auth: Option<&str>,
) -> Proc {
    let conf = dir.join(format!("tinyproxy-{port}.conf"));
    let mut c = format!(
        "Port {port}\nListen {}\nTimeout 600\nLogLevel Info\nMaxClients 50\nConnectPort {tunnel_port}\n",
        pair.outside_ip()
    );
    if let Some((user, pass)) = auth.and_then(|a| a.split_once(':')) {
        c.push_str(&format!("BasicAuth {user} {pass}\n"));
    }
    std::fs::write(&conf, c).unwrap();
    let mut cmd = pair.cmd_outside("tinyproxy");
    cmd.arg("-d").arg("-c").arg(&conf);
    let p = Proc::spawn("tinyproxy", cmd);
    wait_listening(pair, port, "tinyproxy listens");
    p
}

/// dante's SOCKS5 server on the outside address, without authentication.
fn danted(pair: &NetPair, dir: &std::path::Path, port: u16) -> Proc {
    let conf = dir.join("danted.conf");
    let ip = pair.outside_ip();
    std::fs::write(
        &conf,
        format!(
            "logoutput: stderr\ninternal: {ip} port = {port}\nexternal: {ip}\n\
             clientmethod: none\nsocksmethod: none\nuser.privileged: root\nuser.unprivileged: nobody\n\
             client pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n  log: connect error\n}}\n\
             socks pass {{\n  from: 0.0.0.0/0 to: 0.0.0.0/0\n  command: connect\n  log: connect error\n}}\n"
        ),
    )
    .unwrap();
    let bin = ["/usr/sbin/danted", "/sbin/danted"]
        .into_iter()
        .find(|p| std::path::Path::new(p).exists())
        .unwrap_or("danted");
    let mut cmd = pair.cmd_outside(bin);
    cmd.arg("-f").arg(&conf);
    let p = Proc::spawn("danted", cmd);
    wait_listening(pair, port, "danted listens");
    p
}

/// microsocks (SOCKS5) on the outside address with a username and password.
fn microsocks(pair: &NetPair, port: u16, user: &str, pass: &str) -> Proc {
    let mut cmd = pair.cmd_outside("microsocks");
    cmd.args([
        "-i",
        pair.outside_ip(),
        "-p",
        &port.to_string(),
        "-u",
        user,
        "-P",
        pass,
    ]);
    let p = Proc::spawn("microsocks", cmd);
    wait_listening(pair, port, "microsocks listens");
    p
}

/// SQL from the outside namespace through relay-outer's listener.
fn sql_via_relay(rig: &CdcRig, sql: &str) -> Result<String, String> {
    let p = pair(rig);
    psql_in(p.outside_ns(), p.outside_ip(), rig.listen_port, sql)
}

/// relay-inner's first endpoint in `/status`.
fn endpoint_status(rig: &CdcRig) -> serde_json::Value {
    rig.inner().status()["outer"][0].clone()
}

/// Rewrites relay-inner's config with `f` and reloads it (SIGHUP), waiting for the answer.
fn reload_inner(rig: &mut CdcRig, f: impl FnOnce(String) -> String) {
    let path = rig.inner().config.clone();
    let yaml = f(std::fs::read_to_string(&path).unwrap());
    std::fs::write(&path, yaml).unwrap();
    let before = rig.inner().count("configuration reloaded");
    rig.inner.as_mut().unwrap().proc.signal(libc::SIGHUP);
    rig.inner().wait_count(
        "configuration reloaded",
        before + 1,
        Duration::from_secs(20),
    );
}

/// A rig whose relay-inner goes through an HTTP proxy on a free port with credentials
/// `user:password` from a file: (directory, the credentials file, the proxy's port, rig).
fn http_proxy_rig(credentials: &str) -> (tempfile::TempDir, std::path::PathBuf, u16, CdcRig) {
    let dir = routy_e2e::tempdir();
    let creds = dir.path().join("proxy-credentials");
    std::fs::write(&creds, format!("{credentials}\n")).unwrap();
    let port = free_port();
    let rig = rig(
        &format!(
            "proxy: \"http://{{out_ip}}:{port}\", proxy_credentials_file: {}",
            creds.display()
        ),
        &[],
    );
    (dir, creds, port, rig)
}

fn proxy_failures(rig: &CdcRig, reason: &str) -> f64 {
    rig.inner()
        .metric("routy_proxy_failures_total", &[("reason", reason)])
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn through_an_http_proxy_with_a_password_a_standby_and_cdc_pass_and_the_tunnel_heals() {
    require_root();
    let (dir, _creds, port, mut rig) = http_proxy_rig("alice:s3cret");
    let tunnel = rig.tunnel_addr;
    let mut proxy = tinyproxy(
        pair(&rig),
        dir.path(),
        port,
        tunnel.port(),
        Some("alice:s3cret"),
    );
    assert!(
        inside_reaches(pair(&rig), tunnel),
        "before the firewall, relay-outer is reachable directly"
    );
    only_through(pair(&rig), &[port]);
    assert!(
        !inside_reaches(pair(&rig), tunnel),
        "with the firewall, the inside reaches relay-outer only through the proxy"
    );
    rig.start_inner();
    rig.inner().proc.wait_for_log("tunnel up", WAIT);
    assert!(
        proxy.log().contains(&format!("CONNECT {tunnel} HTTP/1.1")),
        "the tunnel went through the proxy:\n{}",
        proxy.log()
    );
    let ep = endpoint_status(&rig);
    assert_eq!(
        ep["proxy"]["url"],
        format!("http://alice@{}:{port}", pair(&rig).outside_ip())
    );
    assert_eq!(ep["proxy"]["from"], "config");
    assert!(
        !rig.inner().proc.log().contains("s3cret"),
        "the password is never logged"
    );

    // A replication client through relay-outer's listener: pg_basebackup, then WAL.
    let p = pair(&rig);
    let standby = Pg::standby_with(
        p.outside_ip(),
        rig.listen_port,
        PgOpts {
            listen: p.outside_ip().to_string(),
            netns: Some(p.outside_ns().to_string()),
            ..PgOpts::default()
        },
    );
    assert_eq!(standby.psql("SELECT count(*) FROM t"), "100");
    // And CDC, which rides the same tunnel.
    rig.source
        .psql("INSERT INTO t SELECT g, 'more ' || g FROM generate_series(101, 200) g");
    rig.wait_in_sync(&["public.t"], WAIT);
    try_wait_until(WAIT, "the standby replays the insert", || {
        standby
            .try_psql("SELECT count(*) FROM t")
            .is_ok_and(|n| n == "200")
    })
    .unwrap();

    // The proxy dies: the session ends, relay-inner keeps trying and counts why.
    proxy.kill9();
    rig.inner().wait_sessions_down(1, WAIT);
    try_wait_until(
        WAIT,
        "a failed attempt at the dead proxy is counted",
        || proxy_failures(&rig, "connect") >= 1.0,
    )
    .unwrap();
    rig.source
        .psql("INSERT INTO t SELECT g, 'while cut ' || g FROM generate_series(201, 300) g");
    let _proxy = tinyproxy(
        pair(&rig),
        dir.path(),
        port,
        tunnel.port(),
        Some("alice:s3cret"),
    );
    rig.inner().wait_count("tunnel up", 2, WAIT);
    rig.wait_in_sync(&["public.t"], WAIT);
    assert_eq!(
        sql_via_relay(&rig, "SELECT count(*) FROM t").unwrap(),
        "300",
        "SQL through the healed tunnel"
    );
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn a_wrong_proxy_password_is_refused_with_the_proxys_answer_until_fixed_by_reload() {
    require_root();
    let (dir, creds, port, mut rig) = http_proxy_rig("alice:wrong");
    let tunnel = rig.tunnel_addr;
    let _proxy = tinyproxy(
        pair(&rig),
        dir.path(),
        port,
        tunnel.port(),
        Some("alice:s3cret"),
    );
    only_through(pair(&rig), &[port]);
    rig.start_inner();
    // tinyproxy answers wrong credentials with a 401 (and none at all with a 407).
    rig.inner()
        .proc
        .wait_for_log("HTTP/1.0 401 Unauthorized", WAIT);
    let log = rig.inner().proc.log();
    assert!(
        log.contains("cannot connect to relay-outer through the proxy")
            && log.contains(&format!(
                "the proxy http://alice@{}:{port} refused the connection",
                pair(&rig).outside_ip()
            )),
        "the proxy's answer is in the log:\n{}",
        routy_e2e::log_tail(&log, 20)
    );
    assert!(proxy_failures(&rig, "auth") >= 1.0);
    let ep = endpoint_status(&rig);
    assert_eq!(ep["up"], false);
    assert!(
        ep["last_error"]["reason"]
            .as_str()
            .unwrap_or("")
            .contains("401"),
        "{ep}"
    );
    assert!(!log.contains("wrong"), "the password is never logged");

    // Fixed in the file, applied by a reload (no restart).
    std::fs::write(&creds, "alice:s3cret\n").unwrap();
    reload_inner(&mut rig, |y| y);
    rig.inner().proc.wait_for_log("tunnel up", WAIT);
    rig.source
        .psql("INSERT INTO t VALUES (1000, 'after the fix')");
    rig.wait_in_sync(&["public.t"], WAIT);
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn socks5_proxies_with_a_password_from_all_proxy_and_without_one_from_the_config() {
    require_root();
    let dir = routy_e2e::tempdir();
    let (micro_port, dante_port) = (free_port(), free_port());
    let mut rig = rig(
        &format!("proxy: \"socks5://alice:wrong@{{out_ip}}:{micro_port}\""),
        &[(
            "ALL_PROXY",
            &format!("socks5://alice:s3cret@{{out_ip}}:{micro_port}"),
        )],
    );
    let mut micro = microsocks(pair(&rig), micro_port, "alice", "s3cret");
    let dante = danted(pair(&rig), dir.path(), dante_port);
    only_through(pair(&rig), &[micro_port, dante_port]);

    // The config's wrong password: the SOCKS answer is named.
    rig.start_inner();
    rig.inner()
        .proc
        .wait_for_log("username/password rejected", WAIT);
    assert!(proxy_failures(&rig, "auth") >= 1.0);

    // Without the key, ALL_PROXY applies (with its right password).
    let out_ip = pair(&rig).outside_ip().to_string();
    let wrong = format!(", proxy: \"socks5://alice:wrong@{out_ip}:{micro_port}\"");
    reload_inner(&mut rig, |y| y.replace(&wrong, ""));
    rig.inner().proc.wait_for_log("tunnel up", WAIT);
    let ep = endpoint_status(&rig);
    assert_eq!(ep["proxy"]["from"], "ALL_PROXY", "{ep}");
    assert_eq!(
        ep["proxy"]["url"],
        format!("socks5://alice@{}:{micro_port}", pair(&rig).outside_ip())
    );
    assert_eq!(
        sql_via_relay(&rig, "SELECT count(*) FROM t").unwrap(),
        "100"
    );

    // A reload to dante (no credentials) applies at the next connection: the live session
    // stays until its proxy goes away.
    reload_inner(&mut rig, |y| {
        y.replacen(
            &format!("server_name: \"{out_ip}\""),
            &format!("server_name: \"{out_ip}\", proxy: \"socks5://{out_ip}:{dante_port}\""),
            1,
        )
    });
    assert_eq!(
        rig.inner().count("tunnel up"),
        1,
        "the reload kept the session"
    );
    micro.kill9();
    rig.inner().wait_count("tunnel up", 2, WAIT);
    let ep = endpoint_status(&rig);
    assert_eq!(ep["proxy"]["from"], "config", "{ep}");
    rig.source
        .psql("INSERT INTO t VALUES (1000, 'through dante')");
    rig.wait_in_sync(&["public.t"], WAIT);
    // dante writes an address and port as 198.18.0.2.7443.
    let t = rig.tunnel_addr;
    assert!(
        dante.log().contains(&format!("{}.{}", t.ip(), t.port())),
        "dante carried the tunnel:\n{}",
        dante.log()
    );
}

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn the_websocket_transport_goes_through_an_http_proxy_with_cdc() {
    require_root();
    let dir = routy_e2e::tempdir();
    let port = free_port();
    let mut rig = rig_with(
        &format!("proxy: \"http://{{out_ip}}:{port}\""),
        &[],
        "transport: websocket\n",
    );
    let tunnel = rig.tunnel_addr;
    let proxy = tinyproxy(pair(&rig), dir.path(), port, tunnel.port(), None);
    only_through(pair(&rig), &[port]);
    rig.start_inner();
    rig.inner().proc.wait_for_log("tunnel up", WAIT);
    assert!(
        proxy.log().contains(&format!("CONNECT {tunnel} HTTP/1.1")),
        "the WebSocket went through the proxy:\n{}",
        proxy.log()
    );
    let ep = endpoint_status(&rig);
    assert_eq!(ep["session"]["transport"], "websocket", "{ep}");
    rig.source
        .psql("INSERT INTO t SELECT g, 'ws ' || g FROM generate_series(101, 2000) g");
    rig.wait_in_sync(&["public.t"], WAIT);
    assert_eq!(
        sql_via_relay(&rig, "SELECT count(*) FROM t").unwrap(),
        "2000"
    );
}
