//! Spool/store records (from a file or from relay-inner over the tunnel).
#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if let Ok(rec) = relay_proto::cdc::Record::decode(data) {
        assert_eq!(relay_proto::cdc::Record::decode(&rec.encode()), Ok(rec));
    }
});
