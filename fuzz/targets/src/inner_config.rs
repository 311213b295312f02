//! relay-inner's YAML configuration file, parsed and validated as `relay-inner run` and
//! `check-config` do (`relay_inner::config::Config::load`): any file gives a
//! configuration or an error naming the field, never a panic.
use std::io::Write;

/// Runs one input.
pub fn run(data: &[u8]) {
    // One file in this thread's scratch directory, rewritten for each input.
    let path = crate::scratch().join("relay-inner.yaml");
    let mut f = std::fs::File::create(&path).expect("the config file can be written");
    f.write_all(data).expect("the config file can be written");
    drop(f);
    let _ = relay_inner::config::Config::load(&path);
}
