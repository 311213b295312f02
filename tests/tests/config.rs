//! `check-config` on both binaries: good files pass, every kind of mistake fails with
//! a message that names the field, and `run` refuses the same files.

use std::time::Duration;

use routy_e2e::relays::{
    check_config, check_config_file, inner_yaml, outer_yaml, ListenerSpec, Pki,
};
use routy_e2e::{bin, run_timeout};

const KA: (&str, &str) = ("5s", "15s");

fn outer_good(pki: &Pki) -> String {
    let l = ListenerSpec::new("orders-pg", "127.0.0.1:15432", "site-a", "orders-pg");
    outer_yaml(pki, "127.0.0.1:7443", KA, &[l], "")
}

fn inner_good(pki: &Pki) -> String {
    inner_yaml(
        pki,
        "site-a",
        &[("127.0.0.1:7443".to_string(), "localhost")],
        &[("orders-pg", "127.0.0.1:5432".to_string())],
        KA,
        "",
    )
}

fn pki() -> Pki {
    let p = Pki::new(&["localhost"]);
    p.issue("site-a");
    p
}

fn assert_fails(which: &str, yaml: &str, needles: &[&str]) {
    let (ok, text) = check_config(which, yaml);
    assert!(!ok, "{which} check-config accepted:\n{yaml}\n{text}");
    for n in needles {
        assert!(
            text.contains(n),
            "{which} check-config message lacks {n:?}:\n{text}"
        );
    }
}

#[test]
fn good_files_pass() {
    let p = pki();
    let (ok, text) = check_config("relay-outer", &outer_good(&p));
    assert!(ok, "{text}");
    assert!(text.contains("ok"), "{text}");
    let (ok, text) = check_config("relay-inner", &inner_good(&p));
    assert!(ok, "{text}");
}

#[test]
fn unknown_keys_are_named() {
    let p = pki();
    let y = outer_good(&p).replace(
        "service: orders-pg",
        "service: orders-pg\n    max_conections: 5",
    );
    assert_fails("relay-outer", &y, &["max_conections"]);
    let y = inner_good(&p).replace("services:", "servces:");
    assert_fails("relay-inner", &y, &["servces"]);
    let y = format!(
        "{}\nadmn: {{ listen: \"127.0.0.1:9464\" }}\n",
        outer_good(&p)
    );
    assert_fails("relay-outer", &y, &["admn"]);
}

#[test]
fn bad_addresses_are_named() {
    let p = pki();
    let y = outer_good(&p).replace("127.0.0.1:15432", "127.0.0.1:99999");
    assert_fails("relay-outer", &y, &["listeners[0].bind", "99999"]);
    let y = outer_good(&p).replace("127.0.0.1:7443", "nowhere");
    assert_fails("relay-outer", &y, &["tunnel.listen"]);
    let y = outer_good(&p).replace("site-a", "Site A");
    assert_fails("relay-outer", &y, &["listeners[0].tunnel"]);
    let y = inner_good(&p).replace("127.0.0.1:5432", "127.0.0.1");
    assert_fails("relay-inner", &y, &["services.orders-pg.target"]);
    let y = inner_good(&p).replace("127.0.0.1:7443", "127.0.0.1:");
    assert_fails("relay-inner", &y, &["outer[0].addr"]);
    let y = inner_good(&p).replace("interval: 5s", "interval: 5 minutes");
    assert_fails("relay-inner", &y, &["unknown unit"]);
}

#[test]
fn missing_files_are_named() {
    let p = pki();
    let (ok, text) = check_config_file(
        "relay-outer",
        std::path::Path::new("/nonexistent/routy.yaml"),
    );
    assert!(!ok);
    assert!(
        text.contains("/nonexistent/routy.yaml") && text.contains("cannot read"),
        "{text}"
    );
    std::fs::remove_file(p.path("outer.key")).unwrap();
    assert_fails("relay-outer", &outer_good(&p), &["tunnel.tls", "outer.key"]);
    std::fs::remove_file(p.path("site-a.crt")).unwrap();
    assert_fails("relay-inner", &inner_good(&p), &["tls", "site-a.crt"]);
    std::fs::write(p.path("ca.crt"), "not a certificate\n").unwrap();
    let (ok, text) = check_config("relay-outer", &outer_good(&p));
    assert!(!ok, "{text}");
}

#[test]
fn run_refuses_a_bad_file_with_the_same_message() {
    let p = pki();
    let dir = routy_e2e::tempdir();
    let f = dir.path().join("outer.yaml");
    std::fs::write(&f, outer_good(&p).replace("listen:", "lisen:")).unwrap();
    let mut cmd = std::process::Command::new(bin("relay-outer"));
    cmd.args(["run", "--config"]).arg(&f);
    let out = run_timeout(&mut cmd, None, Duration::from_secs(30)).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("lisen"));
}

#[test]
fn certs_refuse_bad_names_and_overwrites() {
    let p = pki();
    let mut cmd = std::process::Command::new(bin("relay-outer"));
    cmd.args(["certs", "issue", "--dir"])
        .arg(p.dir())
        .args(["--tunnel", "Bad_Name"]);
    let out = run_timeout(&mut cmd, None, Duration::from_secs(30)).unwrap();
    assert!(!out.status.success());
    let mut cmd = std::process::Command::new(bin("relay-outer"));
    cmd.args(["certs", "init", "--dir"])
        .arg(p.dir())
        .args(["--server-name", "x"]);
    let out = run_timeout(&mut cmd, None, Duration::from_secs(30)).unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("refusing to overwrite"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(p.path("site-a.key"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[test]
fn the_example_configs_in_deploy_pass_check_config() {
    let p = pki();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    for which in ["relay-outer", "relay-inner"] {
        let text =
            std::fs::read_to_string(root.join("deploy").join(format!("{which}.yaml"))).unwrap();
        let text = text.replace("/etc/routy/pki", &p.dir().display().to_string());
        let (ok, out) = check_config(which, &text);
        assert!(ok, "deploy/{which}.yaml: {out}");
    }
}

#[test]
fn log_format_json_and_log_level_flags() {
    let p = pki();
    let dir = routy_e2e::tempdir();
    let f = dir.path().join("outer.yaml");
    let tport = routy_e2e::free_port();
    let l = ListenerSpec::new(
        "x",
        &format!("127.0.0.1:{}", routy_e2e::free_port()),
        "site-a",
        "pg",
    );
    std::fs::write(
        &f,
        outer_yaml(&p, &format!("127.0.0.1:{tport}"), KA, &[l], ""),
    )
    .unwrap();
    let mut cmd = std::process::Command::new(bin("relay-outer"));
    cmd.args([
        "--log-format",
        "json",
        "--log-level",
        "debug",
        "run",
        "--config",
    ])
    .arg(&f);
    let relay = routy_e2e::Proc::spawn("relay-outer-json", cmd);
    relay.wait_for_log("tunnel port ready", Duration::from_secs(20));
    let log = relay.log();
    let lines: Vec<&str> = log.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(!lines.is_empty());
    for line in &lines {
        assert!(
            line.starts_with('{') && line.ends_with('}'),
            "not a JSON line: {line}"
        );
        assert!(line.contains("\"level\":"), "no level: {line}");
    }
    let mut cmd = std::process::Command::new(bin("relay-outer"));
    cmd.args(["--log-format", "yaml", "check-config", "--config"])
        .arg(&f);
    let out = run_timeout(&mut cmd, None, Duration::from_secs(30)).unwrap();
    assert!(
        !out.status.success(),
        "an unknown log format must be refused"
    );
}
