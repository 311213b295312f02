//! The `proxy_answer` target: its body, and what it checks, is `routy_fuzz_targets::proxy_answer`
//! (fuzz/targets/src/proxy_answer.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::proxy_answer::run(data));
