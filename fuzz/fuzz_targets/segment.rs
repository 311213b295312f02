//! The `segment` target: its body, and what it checks, is `routy_fuzz_targets::segment`
//! (fuzz/targets/src/segment.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::segment::run(data));
