//! The `proxy_url` target: its body, and what it checks, is `routy_fuzz_targets::proxy_url`
//! (fuzz/targets/src/proxy_url.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::proxy_url::run(data));
