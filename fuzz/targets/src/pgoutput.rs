//! pgoutput messages from the source database's walsender.
/// Runs one input.
pub fn run(data: &[u8]) {
    let _ = relay_proto::pgoutput::decode(data);
}
