//! Text positions that users and databases hand us: LSNs (`16/B374D848`, from the source
//! database and from `--since`/config) and RFC 3339 times (`--since`, store positions).
use relay_proto::cdc::parse_time;
use relay_proto::lsn::{format_lsn, parse_lsn};

/// Runs one input.
pub fn run(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(lsn) = parse_lsn(text) {
        assert_eq!(parse_lsn(&format_lsn(lsn)), Ok(lsn));
    }
    let _ = parse_time(text);
}
