//! The `pgoutput` target: its body, and what it checks, is `routy_fuzz_targets::pgoutput`
//! (fuzz/targets/src/pgoutput.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::pgoutput::run(data));
