//! The WebSocket transport (`routy_tunnel::websocket`) on relay-outer's tunnel port: the
//! HTTP request head we read and check ourselves before the upgrade, tungstenite's
//! handshake after it, then the binary messages read back as the tunnel's byte stream.
//! With the first byte odd, relay-inner's side instead: the input is the server's answer
//! to our upgrade request (its refusals are turned into our error text).
use crate::{block_on, peer, DEADLINE};
use tokio::io::AsyncReadExt;

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&side, sent)) = data.split_first() else {
        return;
    };
    block_on(async {
        let ws = if side & 1 == 0 {
            routy_tunnel::websocket::accept(peer(sent)).await.ok()
        } else {
            let url = "ws://relay-outer.example:443/routy";
            let _ = routy_tunnel::websocket::connect(peer(sent), url, DEADLINE).await;
            None
        };
        if let Some(mut ws) = ws {
            // Messages are bounded by the input: the stream ends or fails.
            let mut buf = vec![0u8; 64 * 1024];
            while let Ok(n @ 1..) = ws.read(&mut buf).await {
                assert!(n <= buf.len());
            }
        }
    });
}
