//! The benchmark binaries' command lines: `--help` prints the usage and exits 0, an
//! unknown argument is refused with exit code 2. Neither needs root: both exit before
//! starting anything.

use std::process::Command;

fn run(exe: &str, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(exe)
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("{exe}: {e}"));
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn check(exe: &str, name: &str) {
    for help in ["--help", "-h"] {
        let (code, stdout, stderr) = run(exe, &[help]);
        assert_eq!(
            code, 0,
            "{name} {help}: stdout:\n{stdout}\nstderr:\n{stderr}"
        );
        assert!(
            stdout.starts_with(&format!("Usage: {name}")),
            "{name} {help}:\n{stdout}"
        );
        assert!(
            stdout.contains("root"),
            "{name} {help} says it needs root:\n{stdout}"
        );
        assert!(
            stdout.contains("ROUTY_PG_BIN_DIR"),
            "{name} {help}:\n{stdout}"
        );
        assert!(!stderr.contains("panicked"), "{name} {help}:\n{stderr}");
    }

    let (code, stdout, stderr) = run(exe, &["--no-such-flag"]);
    assert_eq!(
        code, 2,
        "{name} --no-such-flag: stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        stderr.contains("unknown argument --no-such-flag") && stderr.contains("Usage:"),
        "{name} --no-such-flag:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "{name}:\n{stderr}");

    // An option without its value is an error too, not a panic.
    let (code, _, stderr) = run(exe, &["--secs"]);
    assert_eq!(code, 2, "{name} --secs:\n{stderr}");
    assert!(
        stderr.contains("--secs needs a value"),
        "{name} --secs:\n{stderr}"
    );
    let (code, _, stderr) = run(exe, &["--secs", "soon"]);
    assert_eq!(code, 2, "{name} --secs soon:\n{stderr}");
    assert!(
        stderr.contains("not a number"),
        "{name} --secs soon:\n{stderr}"
    );
}

#[test]
fn bench_cdc_help_and_bad_arguments() {
    check(env!("CARGO_BIN_EXE_bench-cdc"), "bench-cdc");
}

#[test]
fn bench_tunnel_help_and_bad_arguments() {
    check(env!("CARGO_BIN_EXE_bench-tunnel"), "bench-tunnel");
}
