//! The `frame` target: its body, and what it checks, is `routy_fuzz_targets::frame`
//! (fuzz/targets/src/frame.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::frame::run(data));
