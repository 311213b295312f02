//! Marks the end-to-end tests that need root as ignored unless `ROUTY_E2E=1`.
//!
//! Those tests create network namespaces and firewall rules, mount filesystems and run
//! PostgreSQL as the `postgres` user. A plain `cargo test` lists them as ignored rather
//! than running them or passing them unrun; `tests/run` (as root) sets `ROUTY_E2E=1`, and
//! then a test that still lacks root fails instead of passing.

fn main() {
    println!("cargo::rustc-check-cfg=cfg(routy_e2e_skip)");
    println!("cargo::rerun-if-env-changed=ROUTY_E2E");
    println!("cargo::rerun-if-changed=build.rs");
    if std::env::var("ROUTY_E2E").as_deref() != Ok("1") {
        println!("cargo::rustc-cfg=routy_e2e_skip");
    }
}
