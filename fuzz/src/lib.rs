//! What the fuzz targets share: a runtime for the tunnel's async readers, and a peer
//! whose bytes are the fuzzer's input.
//!
//! The readers under test take any `AsyncRead` (and some an `AsyncWrite` to answer on);
//! [`peer`] gives them the input as what the other side sent, then a clean end of stream,
//! and swallows what they write. Nothing ever waits: every input runs to its end at once.
#![forbid(unsafe_code)]
#![warn(missing_docs)]

use std::cell::RefCell;
use std::future::Future;
use std::time::Duration;

use tokio::io::{Join, Sink};

/// Deadline handed to readers that take one; never reached, since the peer never stalls.
pub const DEADLINE: Duration = Duration::from_secs(60);

thread_local! {
    static RUNTIME: RefCell<Option<tokio::runtime::Runtime>> = const { RefCell::new(None) };
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
