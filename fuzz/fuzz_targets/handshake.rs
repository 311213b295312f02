//! The `handshake` target: its body, and what it checks, is `routy_fuzz_targets::handshake`
//! (fuzz/targets/src/handshake.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::handshake::run(data));
