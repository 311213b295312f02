//! The `lsn_time` target: its body, and what it checks, is `routy_fuzz_targets::lsn_time`
//! (fuzz/targets/src/lsn_time.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::lsn_time::run(data));
