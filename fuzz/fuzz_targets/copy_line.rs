//! The `copy_line` target: its body, and what it checks, is `routy_fuzz_targets::copy_line`
//! (fuzz/targets/src/copy_line.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::copy_line::run(data));
