//! Spool/store records (from a file or from relay-inner over the tunnel), read with copy
//! rows as inserts and kept as blocks: both agree on what decodes.
use relay_proto::cdc::Record;

/// Runs one input.
pub fn run(data: &[u8]) {
    let expanded = Record::decode(data);
    if let Ok(rec) = &expanded {
        assert_eq!(Record::decode(&rec.encode()).as_ref(), Ok(rec));
    }
    let rows = Record::decode_rows(data);
    assert_eq!(rows.is_ok(), expanded.is_ok());
    if let Ok(rec) = rows {
        assert_eq!(Record::decode_rows(&rec.encode()), Ok(rec.clone()));
        assert_eq!(
            Record::expand_rows(rec.events).ok(),
            expanded.ok().map(|r| r.events)
        );
    }
}
