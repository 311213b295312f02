//! The competitors: ways to reach the bench server and PostgreSQL from "outside".
//! Each one forwards two loopback ports (bench server, PostgreSQL) and names the
//! processes whose memory counts.

use std::path::{Path as FsPath, PathBuf};
use std::process::Command;
use std::time::Duration;

use routy_e2e::relays::{inner_yaml, outer_yaml, ListenerSpec, Pki, READY};
use routy_e2e::{bin, free_port, run_timeout, which, Proc};

use super::load;

/// One way from the client to the services.
pub struct Path {
    /// Column name.
    pub name: String,
    /// Port that leads to the bench server.
    pub bench_port: u16,
    /// Port that leads to PostgreSQL.
    pub pg_port: u16,
    /// Processes whose resident memory counts (roots; their descendants count too).
    pub procs: Vec<u32>,
    /// What keeps the path up (processes, temp dirs); dropped at the end.
    _keep: Vec<Box<dyn std::any::Any>>,
}

impl Path {
    /// Total resident memory of this path's processes and their descendants, KiB.
    pub fn rss_kib(&self) -> Option<u64> {
        if self.procs.is_empty() {
            return None;
        }
        let mut pids: Vec<u32> = self
            .procs
            .iter()
            .flat_map(|p| load::process_tree(*p))
            .collect();
        pids.sort_unstable();
        pids.dedup();
        Some(pids.iter().map(|p| load::rss_kib(*p)).sum())
    }
}

/// The targets every path forwards to.
pub struct Targets {
    /// Bench server port.
    pub bench: u16,
    /// PostgreSQL port.
    pub pg: u16,
}

/// No tunnel at all.
pub fn direct(t: &Targets) -> Path {
    Path {
        name: "direct".into(),
        bench_port: t.bench,
        pg_port: t.pg,
        procs: Vec::new(),
        _keep: Vec::new(),
    }
}

/// Starts a relay process at info level (the rig's `Relay::start` logs at debug), from
/// `bin_dir` when given (another build, for `--baseline`), else this build's.
fn relay(
    which: &str,
    bin_dir: Option<&FsPath>,
    dir: &FsPath,
    yaml: &str,
    ready: &str,
) -> Result<Proc, String> {
    let config = dir.join(format!("{which}.yaml"));
    std::fs::write(&config, yaml).map_err(|e| e.to_string())?;
    let exe = bin_dir.map_or_else(|| bin(which), |d| d.join(which));
    let mut cmd = Command::new(exe);
    cmd.arg("run")
        .arg("--config")
        .arg(&config)
        .args(["--log-level", "info"]);
    let p = Proc::spawn(which, cmd);
    p.try_wait_for_log(ready, READY)?;
    Ok(p)
}

/// The inner relay's extra config for a transport (`None`: today's default, TLS).
fn inner_extra(transport: Option<&str>) -> String {
    let mut s = String::from("max_streams_per_session: 16384\n");
    if let Some(t) = transport {
        s.push_str(&format!("transport: {t}\n"));
    }
    s
}

fn inner_cfg(pki: &Pki, tunnel_port: u16, t: &Targets, transport: Option<&str>) -> String {
    inner_yaml(
        pki,
        "site-a",
        &[(format!("127.0.0.1:{tunnel_port}"), "localhost")],
        &[
            ("bench", format!("127.0.0.1:{}", t.bench)),
            ("pg", format!("127.0.0.1:{}", t.pg)),
        ],
        ("5s", "15s"),
        &inner_extra(transport),
    )
}

/// Whether relay-inner accepts `transport: T` (check-config on a complete config).
pub fn routy_accepts_transport(pki: &Pki, t: &Targets, transport: &str) -> (bool, String) {
    let yaml = inner_cfg(pki, free_port(), t, Some(transport));
    routy_e2e::relays::check_config("relay-inner", &yaml)
}

/// relay-outer and relay-inner on loopback, release binaries (this build's, or those in
/// `bin_dir`), info logs.
pub fn routy(
    name: &str,
    pki: &Pki,
    t: &Targets,
    transport: Option<&str>,
    bin_dir: Option<&FsPath>,
) -> Result<Path, String> {
    routy_via(name, pki, t, transport, false, bin_dir)
}

/// tinyproxy on loopback letting CONNECT through to `tunnel_port` only.
fn tinyproxy(dir: &FsPath, tunnel_port: u16) -> Result<(Proc, u16), String> {
    let exe = which("tinyproxy").ok_or("tinyproxy is not installed (apt-get install tinyproxy)")?;
    let port = free_port();
    let conf = dir.join("tinyproxy.conf");
    std::fs::write(
        &conf,
        format!(
            "Port {port}\nListen 127.0.0.1\nTimeout 600\nLogLevel Warning\nMaxClients 100\nConnectPort {tunnel_port}\n"
        ),
    )
    .map_err(|e| e.to_string())?;
    let mut cmd = Command::new(exe);
    cmd.arg("-d").arg("-c").arg(&conf);
    let p = Proc::spawn("tinyproxy", cmd);
    for _ in 0..100 {
        if std::net::TcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok((p, port));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    Err(format!("tinyproxy did not listen:\n{}", tail(&p.log(), 10)))
}

/// [`routy`], with relay-inner dialing through an HTTP CONNECT proxy (tinyproxy on
/// loopback) when `via_proxy`.
pub fn routy_via(
    name: &str,
    pki: &Pki,
    t: &Targets,
    transport: Option<&str>,
    via_proxy: bool,
    bin_dir: Option<&FsPath>,
) -> Result<Path, String> {
    let dir = routy_e2e::tempdir();
    let tunnel_port = free_port();
    let proxy = if via_proxy {
        Some(tinyproxy(dir.path(), tunnel_port)?)
    } else {
        None
    };
    let (bench_port, pg_port) = (free_port(), free_port());
    let limits = "    max_connections: 20000\n";
    let mut lb = ListenerSpec::new(
        "bench",
        &format!("127.0.0.1:{bench_port}"),
        "site-a",
        "bench",
    );
    lb.extra = limits.into();
    let mut lp = ListenerSpec::new("pg", &format!("127.0.0.1:{pg_port}"), "site-a", "pg");
    lp.extra = limits.into();
    let keepalive = "  keepalive: { interval: 5s, timeout: 15s }\n";
    let oy = outer_yaml(
        pki,
        &format!("127.0.0.1:{tunnel_port}"),
        ("5s", "15s"),
        &[lb, lp],
        "",
    )
    .replacen(
        keepalive,
        &format!("{keepalive}  max_streams_per_session: 16384\n"),
        1,
    );
    let outer = relay("relay-outer", bin_dir, dir.path(), &oy, "tunnel port ready")?;
    let mut iy = inner_cfg(pki, tunnel_port, t, transport);
    if let Some((_, port)) = &proxy {
        iy = iy.replacen(
            "server_name: \"localhost\" }",
            &format!("server_name: \"localhost\", proxy: \"http://127.0.0.1:{port}\" }}"),
            1,
        );
    }
    let inner = relay("relay-inner", bin_dir, dir.path(), &iy, "tunnel up")?;
    if !load::wait_ready(bench_port, Duration::from_secs(20)) {
        return Err(format!(
            "{name}: no round trip through the tunnel; relay-inner log:\n{}",
            tail(&inner.log(), 20)
        ));
    }
    let mut procs = vec![outer.pid(), inner.pid()];
    let mut keep: Vec<Box<dyn std::any::Any>> = vec![Box::new(outer), Box::new(inner)];
    if let Some((p, _)) = proxy {
        procs.push(p.pid());
        keep.push(Box::new(p));
    }
    keep.push(Box::new(dir));
    Ok(Path {
        name: name.into(),
        bench_port,
        pg_port,
        procs,
        _keep: keep,
    })
}

fn run_ok(cmd: &mut Command, what: &str) -> Result<String, String> {
    let out = run_timeout(cmd, None, Duration::from_secs(60))?;
    if out.status.success() {
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    } else {
        Err(format!(
            "{what} failed ({}): {}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

/// Makes sure sshd and ssh are installed (Debian packages), installing them if missing.
fn ensure_openssh() -> Result<(), String> {
    let have = || FsPath::new("/usr/sbin/sshd").is_file() && which("ssh").is_some();
    if have() {
        return Ok(());
    }
    eprintln!("openssh missing: apt-get install -y openssh-server openssh-client");
    let _ = run_timeout(
        Command::new("apt-get").arg("update"),
        None,
        Duration::from_secs(300),
    );
    run_timeout(
        Command::new("apt-get")
            .args(["install", "-y", "openssh-server", "openssh-client"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        None,
        Duration::from_secs(600),
    )?;
    if have() {
        Ok(())
    } else {
        Err("openssh-server/openssh-client could not be installed".into())
    }
}

/// The OpenSSH version line (`ssh -V`).
pub fn ssh_version() -> String {
    Command::new("ssh")
        .arg("-V")
        .output()
        .map(|o| String::from_utf8_lossy(&o.stderr).trim().to_string())
        .unwrap_or_default()
}

/// `sshd` on a loopback port with its own host key, and `ssh -N -R` forwarding both ports.
pub fn ssh(t: &Targets) -> Result<Path, String> {
    ensure_openssh()?;
    let dir = routy_e2e::tempdir();
    let d = dir.path();
    for key in ["host_key", "user_key"] {
        run_ok(
            Command::new("ssh-keygen")
                .args(["-q", "-t", "ed25519", "-N", "", "-f"])
                .arg(d.join(key)),
            "ssh-keygen",
        )?;
    }
    std::fs::copy(d.join("user_key.pub"), d.join("authorized_keys")).map_err(|e| e.to_string())?;
    // sshd's privilege separation directory.
    std::fs::create_dir_all("/run/sshd").map_err(|e| format!("create /run/sshd: {e}"))?;
    let port = free_port();
    let config = format!(
        "Port {port}\nListenAddress 127.0.0.1\nHostKey {hk}\nPidFile {pid}\n\
         AuthorizedKeysFile {ak}\nPermitRootLogin yes\nPubkeyAuthentication yes\n\
         PasswordAuthentication no\nKbdInteractiveAuthentication no\nUsePAM no\n\
         StrictModes no\nAllowTcpForwarding yes\nGatewayPorts no\nLogLevel ERROR\n\
         MaxStartups 100\n",
        hk = d.join("host_key").display(),
        pid = d.join("sshd.pid").display(),
        ak = d.join("authorized_keys").display(),
    );
    let cfg = d.join("sshd_config");
    std::fs::write(&cfg, config).map_err(|e| e.to_string())?;
    run_ok(
        Command::new("/usr/sbin/sshd").arg("-t").arg("-f").arg(&cfg),
        "sshd -t",
    )?;
    let mut c = Command::new("/usr/sbin/sshd");
    c.args(["-D", "-e", "-f"]).arg(&cfg);
    let sshd = Proc::spawn("sshd", c);
    // Wait for sshd's port.
    routy_e2e::try_wait_until(Duration::from_secs(20), "sshd port", || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    })
    .map_err(|e| format!("{e}; sshd log: {}", sshd.log()))?;
    let (bench_port, pg_port) = (free_port(), free_port());
    let mut c = Command::new("ssh");
    c.args(["-N", "-i"])
        .arg(d.join("user_key"))
        .args(["-p", &port.to_string()])
        .args([
            "-o",
            "StrictHostKeyChecking=no",
            "-o",
            "UserKnownHostsFile=/dev/null",
        ])
        .args([
            "-o",
            "BatchMode=yes",
            "-o",
            "ExitOnForwardFailure=yes",
            "-o",
            "LogLevel=ERROR",
        ])
        .args(["-F", "/dev/null"])
        .args([
            "-R",
            &format!("127.0.0.1:{bench_port}:127.0.0.1:{}", t.bench),
        ])
        .args(["-R", &format!("127.0.0.1:{pg_port}:127.0.0.1:{}", t.pg)])
        .arg("root@127.0.0.1");
    let client = Proc::spawn("ssh", c);
    if !load::wait_ready(bench_port, Duration::from_secs(30)) {
        return Err(format!(
            "no round trip through ssh -R; ssh log: {}; sshd log: {}",
            client.log(),
            sshd.log()
        ));
    }
    Ok(Path {
        name: "ssh -R".into(),
        bench_port,
        pg_port,
        procs: vec![sshd.pid(), client.pid()],
        _keep: vec![Box::new(client), Box::new(sshd), Box::new(dir)],
    })
}

/// Finds rathole: `$ROUTY_RATHOLE`, PATH, or (with `install`) `cargo install rathole
/// --root /tmp/rathole`.
pub fn find_rathole(install: bool) -> Result<PathBuf, String> {
    if let Some(p) = std::env::var_os("ROUTY_RATHOLE").filter(|p| !p.is_empty()) {
        let p = PathBuf::from(p);
        return if p.is_file() {
            Ok(p)
        } else {
            Err(format!("$ROUTY_RATHOLE={} is not a file", p.display()))
        };
    }
    if let Some(p) = which("rathole") {
        return Ok(p);
    }
    let scratch = PathBuf::from("/tmp/rathole/bin/rathole");
    if !install {
        return Err("rathole not found (on PATH or in $ROUTY_RATHOLE); \
                    pass --install-rathole to `cargo install` it into /tmp/rathole"
            .into());
    }
    if scratch.is_file() {
        return Ok(scratch);
    }
    eprintln!("installing rathole: cargo install rathole --root /tmp/rathole (a few minutes)");
    let out = run_timeout(
        Command::new("cargo")
            .args(["install", "rathole", "--root", "/tmp/rathole"])
            .env_remove("CARGO_TARGET_DIR"),
        None,
        Duration::from_secs(1800),
    )?;
    if out.status.success() && scratch.is_file() {
        Ok(scratch)
    } else {
        Err(format!(
            "cargo install rathole failed: {}",
            tail(&String::from_utf8_lossy(&out.stderr), 10)
        ))
    }
}

/// rathole's version line.
pub fn rathole_version(exe: &FsPath) -> String {
    Command::new(exe)
        .arg("--version")
        .output()
        .map(|o| {
            let text = String::from_utf8_lossy(&o.stdout).into_owned();
            text.lines()
                .find_map(|l| l.trim().strip_prefix("Build Version:"))
                .map(|v| format!("rathole {}", v.trim()))
                .unwrap_or_else(|| text.trim().to_string())
        })
        .unwrap_or_default()
}

/// rathole server and client with the TLS transport (certificate from our PKI, as PKCS#12).
pub fn rathole(exe: &FsPath, pki: &Pki, t: &Targets) -> Result<Path, String> {
    let dir = routy_e2e::tempdir();
    let d = dir.path();
    let p12 = d.join("identity.p12");
    run_ok(
        Command::new("openssl")
            .args(["pkcs12", "-export", "-passout", "pass:bench", "-out"])
            .arg(&p12)
            .arg("-inkey")
            .arg(pki.path("outer.key"))
            .arg("-in")
            .arg(pki.path("outer.crt")),
        "openssl pkcs12",
    )?;
    let port = free_port();
    let (bench_port, pg_port) = (free_port(), free_port());
    let server = format!(
        "[server]\nbind_addr = \"127.0.0.1:{port}\"\n\
         [server.transport]\ntype = \"tls\"\n\
         [server.transport.tls]\npkcs12 = \"{p12}\"\npkcs12_password = \"bench\"\n\
         [server.services.bench]\ntoken = \"bench-token\"\nbind_addr = \"127.0.0.1:{bench_port}\"\n\
         [server.services.pg]\ntoken = \"pg-token\"\nbind_addr = \"127.0.0.1:{pg_port}\"\n",
        p12 = p12.display()
    );
    let client = format!(
        "[client]\nremote_addr = \"localhost:{port}\"\n\
         [client.transport]\ntype = \"tls\"\n\
         [client.transport.tls]\ntrusted_root = \"{ca}\"\nhostname = \"localhost\"\n\
         [client.services.bench]\ntoken = \"bench-token\"\nlocal_addr = \"127.0.0.1:{b}\"\n\
         [client.services.pg]\ntoken = \"pg-token\"\nlocal_addr = \"127.0.0.1:{p}\"\n",
        ca = pki.path("ca.crt").display(),
        b = t.bench,
        p = t.pg,
    );
    let (sf, cf) = (d.join("server.toml"), d.join("client.toml"));
    std::fs::write(&sf, server).map_err(|e| e.to_string())?;
    std::fs::write(&cf, client).map_err(|e| e.to_string())?;
    let mut c = Command::new(exe);
    c.arg("--server").arg(&sf).env("RUST_LOG", "warn");
    let srv = Proc::spawn("rathole-server", c);
    let mut c = Command::new(exe);
    c.arg("--client").arg(&cf).env("RUST_LOG", "warn");
    let cli = Proc::spawn("rathole-client", c);
    if !load::wait_ready(bench_port, Duration::from_secs(30)) {
        return Err(format!(
            "no round trip through rathole; server log: {}; client log: {}",
            srv.log(),
            cli.log()
        ));
    }
    Ok(Path {
        name: "rathole".into(),
        bench_port,
        pg_port,
        procs: vec![srv.pid(), cli.pid()],
        _keep: vec![Box::new(cli), Box::new(srv), Box::new(dir)],
    })
}

/// The last `n` lines of `text`.
fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// Makes sure socat is installed (Debian package), installing it if missing.
fn ensure_socat() -> Result<PathBuf, String> {
    if let Some(p) = which("socat") {
        return Ok(p);
    }
    eprintln!("socat missing: apt-get install -y socat");
    run_timeout(
        Command::new("apt-get")
            .args(["install", "-y", "socat"])
            .env("DEBIAN_FRONTEND", "noninteractive"),
        None,
        Duration::from_secs(600),
    )?;
    which("socat").ok_or_else(|| "socat could not be installed".into())
}

/// A reference, not a competitor: two plain TCP forwarders in series (socat, one process
/// per connection, 256 KiB buffers), no encryption and no multiplexing. What any pair of
/// relays pays for the two extra loopback hops alone; its figures bound what an encrypted
/// tunnel can reach on this machine.
pub fn socat_chain(t: &Targets) -> Result<Path, String> {
    let exe = ensure_socat()?;
    let mut keep: Vec<Box<dyn std::any::Any>> = Vec::new();
    let mut front = Vec::new();
    for target in [t.bench, t.pg] {
        let mut to = target;
        for hop in ["inner", "outer"] {
            let port = free_port();
            let mut cmd = Command::new(&exe);
            cmd.args(["-b", "262144"])
                .arg(format!(
                    "TCP-LISTEN:{port},bind=127.0.0.1,reuseaddr,fork,backlog=4096"
                ))
                .arg(format!("TCP:127.0.0.1:{to},nodelay"));
            keep.push(Box::new(Proc::spawn(&format!("socat-{hop}-{target}"), cmd)));
            to = port;
        }
        front.push(to);
    }
    if !load::wait_ready(front[0], Duration::from_secs(10)) {
        return Err("socat chain: no round trip".into());
    }
    Ok(Path {
        name: "2x socat, plain TCP".into(),
        bench_port: front[0],
        pg_port: front[1],
        // Memory per idle stream is not measured: socat forks a process per connection.
        procs: Vec::new(),
        _keep: keep,
    })
}
