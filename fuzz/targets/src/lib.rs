//! The bodies of the fuzz targets: one module per decoder of bytes that come from outside
//! (the tunnel peer, the source database, a proxy, an HTTP client, a file on disk, an
//! operator), each with a `run(data)` that must never panic on any input, only give a
//! value or an error (and where it says so, check a round trip).
//!
//! Two callers: the libFuzzer binaries in `fuzz/fuzz_targets/` (built with coverage
//! instrumentation by `fuzz/run`), and `tests/corpus.rs` here, which runs every committed
//! input of `fuzz/corpus/TARGET/` through its target on every `cargo test`, so an input
//! that once crashed a decoder stays a regression test without libFuzzer.
//!
//! The readers under test that are async take any `AsyncRead` (and some an `AsyncWrite`
//! to answer on); [`peer`] gives them the input as what the other side sent, then a clean
//! end of stream, and swallows what they write. Nothing ever waits: every input runs to
//! its end at once.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::cell::RefCell;
use std::future::Future;
use std::path::PathBuf;
use std::time::Duration;

use tokio::io::{Join, Sink};

pub mod cdc_record;
pub mod copy_line;
pub mod frame;
pub mod handshake;
pub mod inner_config;
pub mod lsn_time;
pub mod pgoutput;
pub mod proxy_answer;
pub mod proxy_url;
pub mod segment;
pub mod ship_message;
pub mod ship_stream;
pub mod websocket;

/// A target's body: runs one input.
pub type Body = fn(&[u8]);

/// Every target by name (the name of its binary in `fuzz/fuzz_targets/` and of its
/// corpus directory), with its body.
pub const TARGETS: &[(&str, Body)] = &[
    ("cdc_record", cdc_record::run),
    ("copy_line", copy_line::run),
    ("frame", frame::run),
    ("handshake", handshake::run),
    ("inner_config", inner_config::run),
    ("lsn_time", lsn_time::run),
    ("pgoutput", pgoutput::run),
    ("proxy_answer", proxy_answer::run),
    ("proxy_url", proxy_url::run),
    ("segment", segment::run),
    ("ship_message", ship_message::run),
    ("ship_stream", ship_stream::run),
    ("websocket", websocket::run),
];

/// Deadline handed to readers that take one; never reached, since the peer never stalls.
pub const DEADLINE: Duration = Duration::from_secs(60);

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
    static SCRATCH: RefCell<Option<PathBuf>> = const { RefCell::new(None) };
}

/// Runs `f` to completion on one current-thread runtime (built at the first call and
/// kept, so each input costs no runtime setup).
pub fn block_on<F: Future>(f: F) -> F::Output {
    RUNTIME.with(|cell| {
        let mut slot = cell.borrow_mut();
        let rt = slot.get_or_insert_with(|| {
            tokio::runtime::Builder::new_current_thread()
                .enable_time()
                .build()
                .expect("a current-thread runtime builds")
        });
        rt.block_on(f)
    })
}

/// A peer that sent `input`, then closed its side, and that reads nothing we write.
pub fn peer(input: &[u8]) -> Join<&[u8], Sink> {
    tokio::io::join(input, tokio::io::sink())
}

/// This thread's scratch directory for targets that read files (config files, segment
/// logs), under `$TMPDIR`: made at the first call and kept, since libFuzzer exits without
/// unwinding (`fuzz/run` points `$TMPDIR` at a directory of its own and removes it).
pub fn scratch() -> PathBuf {
    SCRATCH.with(|cell| {
        cell.borrow_mut()
            .get_or_insert_with(|| {
                tempfile::Builder::new()
                    .prefix("routy-fuzz-")
                    .tempdir()
                    .expect("a temporary directory")
                    .keep()
            })
            .clone()
    })
}

/// Removes this thread's scratch directory, if [`scratch`] made one.
pub fn remove_scratch() {
    if let Some(dir) = SCRATCH.with(|cell| cell.borrow_mut().take()) {
        let _ = std::fs::remove_dir_all(dir);
    }
}
