//! Every end-to-end suite, one module per file of this directory, in one test binary:
//! one link instead of one per suite, and the suites' tests share the test threads
//! (`RUST_TEST_THREADS`, 2 under `tests/run`) instead of each suite's binary waiting for
//! its slowest test before the next one starts. Test names start with their suite
//! (`cdc::no_loss_...`), so `tests/run --test e2e cdc::` runs one suite and
//! `tests/run -- --list` lists them all.

#[path = "admin.rs"]
mod admin;
#[path = "bad_input.rs"]
mod bad_input;
#[path = "bench_cli.rs"]
mod bench_cli;
#[path = "browser_harness.rs"]
mod browser_harness;
#[path = "cdc.rs"]
mod cdc;
#[path = "cdc_faults.rs"]
mod cdc_faults;
#[path = "cdc_ops.rs"]
mod cdc_ops;
#[path = "cdc_stall.rs"]
mod cdc_stall;
#[path = "chaos.rs"]
mod chaos;
#[path = "config.rs"]
mod config;
#[path = "console.rs"]
mod console;
#[path = "consumers.rs"]
mod consumers;
#[path = "dashboards.rs"]
mod dashboards;
#[path = "filters.rs"]
mod filters;
#[path = "firewall.rs"]
mod firewall;
#[path = "flaps.rs"]
mod flaps;
#[path = "harness.rs"]
mod harness;
#[path = "limits.rs"]
mod limits;
#[path = "operations.rs"]
mod operations;
#[path = "proxy.rs"]
mod proxy;
#[path = "quic.rs"]
mod quic;
#[path = "resync.rs"]
mod resync;
#[path = "revocation.rs"]
mod revocation;
#[path = "schema.rs"]
mod schema;
#[path = "sinks.rs"]
mod sinks;
#[path = "tunnel.rs"]
mod tunnel;
#[path = "warehouse.rs"]
mod warehouse;
#[path = "websocket.rs"]
mod websocket;

/// A suite file this binary does not name would never be compiled or run (the package
/// has `autotests = false`): every `*.rs` here must be a module above, or a `[[test]]` of
/// its own in tests/Cargo.toml (bandwidth.rs: its measurements run alone).
#[test]
fn every_suite_file_is_a_module_of_this_binary() {
    let me = include_str!("e2e.rs");
    let manifest = include_str!("../Cargo.toml");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests");
    let mut missing = Vec::new();
    for entry in std::fs::read_dir(&dir).expect("tests/tests lists") {
        let name = entry.expect("tests/tests lists").file_name();
        let Some(suite) = name.to_str().and_then(|n| n.strip_suffix(".rs")) else {
            continue;
        };
        let module = me.contains(&format!("#[path = \"{suite}.rs\"]\nmod {suite};"));
        let own = manifest.contains(&format!("path = \"tests/{suite}.rs\""));
        if !module && !own {
            missing.push(suite.to_string());
        }
    }
    assert!(
        missing.is_empty(),
        "suites not in tests/tests/e2e.rs (add `#[path = \"NAME.rs\"] mod NAME;`): {missing:?}"
    );
}
