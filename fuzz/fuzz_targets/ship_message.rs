//! Shipping messages (batches, acks, errors) from the tunnel peer.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = relay_proto::cdc::ShipMessage::decode_body(data);
});
