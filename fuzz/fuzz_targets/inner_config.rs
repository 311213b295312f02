//! relay-inner's YAML configuration file, parsed and validated as `relay-inner run` and
//! `check-config` do (`relay_inner::config::Config::load`): any file gives a
//! configuration or an error naming the field, never a panic.
#![no_main]
use std::io::Write;

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    // One file per process, rewritten for each input; the directory outlives the run
    // (libFuzzer exits without unwinding) and holds nothing else.
    thread_local! {
        static FILE: std::path::PathBuf = {
            let dir = tempfile::Builder::new()
                .prefix("routy-fuzz-config-")
                .tempdir()
                .expect("a temporary directory")
                .keep();
            dir.join("relay-inner.yaml")
        };
    }
    FILE.with(|path| {
        let mut f = std::fs::File::create(path).expect("the config file can be written");
        f.write_all(data).expect("the config file can be written");
        drop(f);
        let _ = relay_inner::config::Config::load(path);
    });
});
