//! relay-outer (placeholder while the modules land).
#![allow(dead_code)]
mod certs;
fn main() {}
