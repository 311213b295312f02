//! The `ship_message` target: its body, and what it checks, is `routy_fuzz_targets::ship_message`
//! (fuzz/targets/src/ship_message.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::ship_message::run(data));
