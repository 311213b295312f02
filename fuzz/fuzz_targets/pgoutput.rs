//! pgoutput messages from the source database's walsender.
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let _ = relay_proto::pgoutput::decode(data);
});
