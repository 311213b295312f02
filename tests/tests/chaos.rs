//! A short seeded chaos run (see `routy_e2e::chaos`): every kind of fault at least once
//! under load, then source and target must be identical, no transaction applied twice
//! and no client query answered wrongly. `ROUTY_CHAOS_SEED` and `ROUTY_CHAOS_SECS`
//! override the seed and the length (the long run is `target/release/chaos --secs 1800`).

use std::time::Duration;

use routy_e2e::chaos::{run, ChaosOpts, FAULTS};
use routy_e2e::require_root;

#[test]
#[cfg_attr(
    routy_e2e_skip,
    ignore = "end-to-end: needs root and ROUTY_E2E=1; run tests/run"
)]
fn chaos_short_run_keeps_every_promise() {
    require_root();
    let env = |k: &str, default: u64| {
        std::env::var(k)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    };
    let opts = ChaosOpts {
        seed: env("ROUTY_CHAOS_SEED", 11),
        duration: Duration::from_secs(env("ROUTY_CHAOS_SECS", 75)),
        faults: Vec::new(),
        catch_up: Duration::from_secs(240),
    };
    let report = run(&opts);
    let md = report.markdown();
    eprintln!("{md}");
    assert!(
        report.passed(),
        "a promise was broken (seed {}):\n{md}",
        report.seed
    );
    assert!(report.transactions > 0, "the load ran:\n{md}");
    assert!(
        report.queries_ok > 0,
        "queries went through the tunnel:\n{md}"
    );
    let kinds = report.injected.len();
    assert!(
        kinds * 2 >= FAULTS.len(),
        "a short run should still inject most kinds of fault ({kinds} of {}):\n{md}",
        FAULTS.len()
    );
}
