//! Lines of `COPY ... TO STDOUT` (text format) from the source database.
/// Runs one input.
pub fn run(data: &[u8]) {
    let _ = relay_proto::copy_text::parse_copy_line(data);
}
