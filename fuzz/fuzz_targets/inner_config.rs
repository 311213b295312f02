//! The `inner_config` target: its body, and what it checks, is `routy_fuzz_targets::inner_config`
//! (fuzz/targets/src/inner_config.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::inner_config::run(data));
