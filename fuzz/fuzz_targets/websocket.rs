//! The `websocket` target: its body, and what it checks, is `routy_fuzz_targets::websocket`
//! (fuzz/targets/src/websocket.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::websocket::run(data));
