//! Shipping messages (batches, acks, errors) from the tunnel peer.
/// Runs one input.
pub fn run(data: &[u8]) {
    let _ = relay_proto::cdc::ShipMessage::decode_body(data);
}
