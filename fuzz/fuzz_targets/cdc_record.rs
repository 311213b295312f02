//! The `cdc_record` target: its body, and what it checks, is `routy_fuzz_targets::cdc_record`
//! (fuzz/targets/src/cdc_record.rs).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| routy_fuzz_targets::cdc_record::run(data));
