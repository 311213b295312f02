//! Lines of `COPY ... TO STDOUT` (text format) from the source database.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = relay_proto::copy_text::parse_copy_line(data);
});
