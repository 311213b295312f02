//! The tunnel handshake over the control stream: relay-outer reading relay-inner's Hello,
//! and relay-inner reading relay-outer's answer (HelloAck or Error). The first byte picks
//! the side; the rest is what the peer sent. Any bytes give a result or an error.
use crate::{block_on, peer, DEADLINE};
use relay_proto::frame::Hello;
use routy_tunnel::handshake;

/// Runs one input.
pub fn run(data: &[u8]) {
    let Some((&side, sent)) = data.split_first() else {
        return;
    };
    block_on(async {
        let mut io = peer(sent);
        if side & 1 == 0 {
            if let Ok(hello) = handshake::server_read_hello(&mut io, DEADLINE).await {
                assert_eq!(hello.protocol, handshake::PROTOCOL_VERSION);
            }
        } else {
            let hello = Hello {
                protocol: handshake::PROTOCOL_VERSION,
                node: "fuzz".into(),
                services: vec!["pg".into()],
                features: vec![],
            };
            if let Ok(ack) = handshake::client(&mut io, hello, DEADLINE).await {
                assert_eq!(ack.protocol, handshake::PROTOCOL_VERSION);
            }
        }
    });
}
