//! The `ship_stream` target: its body, and what it checks, is `routy_fuzz_targets::ship_stream`
//! (fuzz/targets/src/ship_stream.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::ship_stream::run(data));
