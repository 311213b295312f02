//! A CDC shipping stream as relay-outer's receiver and relay-inner's shipper read it
//! (`routy_tunnel::ship::read`): length-prefixed messages one after another, until the
//! end of the stream or the first error.
use crate::{block_on, peer};

/// Runs one input.
pub fn run(data: &[u8]) {
    block_on(async {
        let mut io = peer(data);
        // Every message takes at least its 4-byte length: the loop ends.
        while let Ok(Some(msg)) = routy_tunnel::ship::read(&mut io).await {
            // What was read writes again, and reads back the same.
            let again = msg.encode().expect("a decoded message encodes");
            let mut back = peer(&again);
            let read = routy_tunnel::ship::read(&mut back).await;
            assert_eq!(read.ok().flatten().as_ref(), Some(&msg));
        }
    });
}
