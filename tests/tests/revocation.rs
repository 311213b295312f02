//! Certificate revocation and path rules with the real binaries: `relay-outer certs
//! revoke`, `tunnel.tls.crl` applied by a reload that also closes the revoked tunnel's
//! live session, a new certificate that gets back in, relay-inner's own `tls.crl`, and a
//! client certificate issued through an intermediate CA under the `pathlen:0` Routy CA
//! (refused, as `openssl verify` refuses it).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use routy_e2e::relays::{inner_yaml, outer_yaml, ListenerSpec, Pki, Relay, Tunnel};
use routy_e2e::{bin, free_port, Pg, PgOpts};
use routy_ops::metrics as m;

const KA: (&str, &str) = ("500ms", "3s");
const SOON: Duration = Duration::from_secs(30);

/// Runs a command; its stdout and stderr, asserting success.
fn run(cmd: &mut Command) -> String {
    let out = cmd.output().expect("run command");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{cmd:?} failed: {text}");
    text
}

fn certs(args: &[&str], dir: &Path) -> String {
    run(Command::new(bin("relay-outer"))
        .arg("certs")
        .args(&args[..1])
        .arg("--dir")
        .arg(dir)
        .args(&args[1..]))
}

/// Rewrites `r`'s config with `edit`, sends SIGHUP and waits for the `n`-th verdict.
fn reload(r: &mut Relay, edit: impl FnOnce(String) -> String) {
    let n = r.count("configuration reloaded") + 1;
    let y = std::fs::read_to_string(&r.config).unwrap();
    std::fs::write(&r.config, edit(y)).unwrap();
    r.proc.signal(libc::SIGHUP);
    r.wait_count("configuration reloaded", n, SOON);
}

#[test]
fn a_revoked_tunnel_is_closed_at_reload_refused_after_and_a_new_certificate_gets_in() {
    let mut t = Tunnel::start(KA, "");
    assert_eq!(t.sql("SELECT 1").unwrap(), "1");
    let out = certs(&["revoke", "--tunnel", "site-a"], t.pki.dir());
    assert!(out.contains("revoked") && out.contains("crl.pem"), "{out}");
    let crl = t.pki.path("crl.pem");
    // The list alone changes nothing until relay-outer's config names it.
    assert_eq!(t.sql("SELECT 2").unwrap(), "2");
    reload(&mut t.outer, |y| {
        y.replace(
            &format!("client_ca: {} }}", t.pki.path("ca.crt").display()),
            &format!(
                "client_ca: {}, crl: [{}] }}",
                t.pki.path("ca.crt").display(),
                crl.display()
            ),
        )
    });
    t.outer
        .wait_count("closing session: its certificate is revoked", 1, SOON);
    // relay-inner reconnects and is refused at the handshake, naming the reason.
    t.outer
        .wait_metric(m::HANDSHAKE_FAILURES, &[("reason", "tls")], SOON, |v| {
            v >= 1.0
        });
    t.inner.wait_count("certificate is revoked", 1, SOON);
    routy_e2e::wait_until(SOON, "the revoked session gone", || {
        t.outer.metric(m::SESSIONS_UP, &[]) == 0.0
    });
    assert!(t.sql("SELECT 3").is_err(), "no tunnel while revoked");
    // A new certificate for the same tunnel (a new serial) is accepted after relay-inner
    // reloads it.
    certs(&["issue", "--tunnel", "site-a", "--force"], t.pki.dir());
    t.inner.proc.signal(libc::SIGHUP);
    t.outer.wait_sessions_up(2, SOON);
    let ok = routy_e2e::try_wait_until(SOON, "SQL through the new certificate", || {
        t.sql("SELECT 4").is_ok_and(|r| r == "4")
    });
    assert!(ok.is_ok(), "{ok:?}");
    // Expiry metrics on both relays, by configuration key.
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs_f64();
    for (r, key) in [(&t.outer, "tunnel.tls.cert"), (&t.inner, "tls.cert")] {
        let v = r.metric(m::CERT_EXPIRY, &[("key", key)]);
        assert!(v > now + 30.0 * 86_400.0, "{key}: {v}");
    }
}

#[test]
fn relay_inner_refuses_a_revoked_relay_outer_until_its_list_allows_it() {
    let pg = Pg::start(PgOpts::default());
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    pki.issue("site-a");
    let outer_crt = pki.path("outer.crt");
    certs(
        &["revoke", "--cert", outer_crt.to_str().unwrap()],
        pki.dir(),
    );
    let tunnel_port = free_port();
    let listen = format!("127.0.0.1:{}", free_port());
    let outer = Relay::outer(
        &outer_yaml(
            &pki,
            &format!("127.0.0.1:{tunnel_port}"),
            KA,
            &[ListenerSpec::new("pg", &listen, "site-a", "pg")],
            "",
        ),
        None,
    );
    let ca = format!("ca: {} }}", pki.path("ca.crt").display());
    let with_crl = format!(
        "ca: {}, crl: {} }}",
        pki.path("ca.crt").display(),
        pki.path("crl.pem").display()
    );
    let y = inner_yaml(
        &pki,
        "site-a",
        &[(format!("127.0.0.1:{tunnel_port}"), "localhost")],
        &[("pg", format!("127.0.0.1:{}", pg.port()))],
        KA,
        "",
    );
    let mut inner = Relay::start(
        "relay-inner",
        "relay-inner",
        &y.replace(&ca, &with_crl),
        None,
    );
    inner.wait_count("invalid peer certificate: Revoked", 1, SOON);
    assert_eq!(
        outer.sessions_up(),
        0,
        "no session with a revoked relay-outer"
    );
    assert!(!inner.proc.log().contains("tunnel up"));
    // Without the list, the next dial gets through.
    reload(&mut inner, |y| y.replace(&with_crl, &ca));
    inner.wait_count("tunnel up", 1, SOON);
}

#[test]
fn a_client_certificate_through_an_intermediate_ca_is_refused() {
    let pki = Pki::new(&["localhost", "127.0.0.1"]);
    let d = pki.dir();
    let ssl = |args: &[&str]| run(Command::new("openssl").current_dir(d).args(args));
    let ext = |name: &str, text: &str| std::fs::write(d.join(name), text).unwrap();
    ext(
        "mid.ext",
        "basicConstraints=critical,CA:TRUE,pathlen:0\nkeyUsage=critical,keyCertSign,cRLSign\n",
    );
    ext(
        "leaf.ext",
        "basicConstraints=critical,CA:FALSE\nkeyUsage=critical,digitalSignature\n\
         extendedKeyUsage=clientAuth\nsubjectAltName=DNS:site-b\n",
    );
    for k in ["mid.key", "site-b.key"] {
        ssl(&[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            k,
        ]);
    }
    ssl(&[
        "req",
        "-new",
        "-key",
        "mid.key",
        "-subj",
        "/CN=Intermediate CA",
        "-out",
        "mid.csr",
    ]);
    ssl(&[
        "x509",
        "-req",
        "-in",
        "mid.csr",
        "-CA",
        "ca.crt",
        "-CAkey",
        "ca.key",
        "-set_serial",
        "1001",
        "-days",
        "30",
        "-extfile",
        "mid.ext",
        "-out",
        "mid.crt",
    ]);
    ssl(&[
        "req",
        "-new",
        "-key",
        "site-b.key",
        "-subj",
        "/CN=site-b",
        "-out",
        "leaf.csr",
    ]);
    ssl(&[
        "x509",
        "-req",
        "-in",
        "leaf.csr",
        "-CA",
        "mid.crt",
        "-CAkey",
        "mid.key",
        "-set_serial",
        "1002",
        "-days",
        "30",
        "-extfile",
        "leaf.ext",
        "-out",
        "leaf.crt",
    ]);
    let chain = format!(
        "{}{}",
        std::fs::read_to_string(d.join("leaf.crt")).unwrap(),
        std::fs::read_to_string(d.join("mid.crt")).unwrap()
    );
    std::fs::write(d.join("site-b.crt"), chain).unwrap();
    // openssl refuses the chain: the Routy CA says pathlen:0.
    let verify = Command::new("openssl")
        .current_dir(d)
        .args([
            "verify",
            "-CAfile",
            "ca.crt",
            "-untrusted",
            "mid.crt",
            "leaf.crt",
        ])
        .output()
        .unwrap();
    assert!(
        !verify.status.success(),
        "openssl verify accepted the chain"
    );

    let pg = Pg::start(PgOpts::default());
    let tunnel_port = free_port();
    let listen = format!("127.0.0.1:{}", free_port());
    let mut outer = Relay::outer(
        &outer_yaml(
            &pki,
            &format!("127.0.0.1:{tunnel_port}"),
            KA,
            &[ListenerSpec::new("pg", &listen, "site-b", "pg")],
            "",
        ),
        None,
    );
    let y = inner_yaml(
        &pki,
        "site-b",
        &[(format!("127.0.0.1:{tunnel_port}"), "localhost")],
        &[("pg", format!("127.0.0.1:{}", pg.port()))],
        KA,
        "",
    );
    let inner = Relay::start("relay-inner", "relay-inner", &y, None);
    outer.wait_count("tls.max_intermediates", 1, SOON);
    // Allowing one intermediate is not enough: the CA's own pathlen:0 still applies.
    let ca = format!("client_ca: {} }}", pki.path("ca.crt").display());
    reload(&mut outer, |y| {
        y.replace(
            &ca,
            &format!(
                "client_ca: {}, max_intermediates: 1 }}",
                pki.path("ca.crt").display()
            ),
        )
    });
    outer.wait_count("pathlen:0", 1, SOON);
    assert_eq!(outer.sessions_up(), 0, "no session ever");
    assert!(!inner.proc.log().contains("tunnel up"));
    assert!(!outer.proc.log().contains("panicked"));
}
