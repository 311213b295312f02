//! Positions in a source's change log, and the file that keeps an at-least-once sink's.
//!
//! A position names one event: the store seq of its record and its index in the record,
//! written `SEQ.INDEX` (`1042.3`). Positions are stable across restarts and totally
//! ordered per source; they are the ids of Server-Sent Events and the idempotency keys
//! of webhook deliveries. A sink's position is the next event it delivers; `0.0` means
//! "from the oldest record the store holds".

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// One event's place in a source's log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Default)]
pub struct Position {
    /// Store seq of the record.
    pub seq: u64,
    /// Index of the event in the record.
    pub idx: u32,
}

impl Position {
    /// The oldest record held.
    pub const START: Position = Position { seq: 0, idx: 0 };

    /// The position of event `idx` of record `seq`.
    pub fn new(seq: u64, idx: u32) -> Position {
        Position { seq, idx }
    }

    /// The first event after record `seq`.
    pub fn after_record(seq: u64) -> Position {
        if seq == 0 {
            Position::START
        } else {
            Position::new(seq + 1, 0)
        }
    }

    /// Every record before this one's is delivered: the seq of the last such record.
    pub fn applied_seq(self) -> u64 {
        self.seq.saturating_sub(1)
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}", self.seq, self.idx)
    }
}

/// A position that is not `SEQ` or `SEQ.INDEX`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not a position (SEQ or SEQ.INDEX, like 1042.3)")]
pub struct BadPosition(pub String);

impl FromStr for Position {
    type Err = BadPosition;

    fn from_str(s: &str) -> Result<Position, BadPosition> {
        let bad = || BadPosition(s.chars().take(64).collect());
        let (seq, idx) = match s.trim().split_once('.') {
            Some((a, b)) => (a, b),
            None => (s.trim(), "0"),
        };
        let digits =
            |t: &str| !t.is_empty() && t.len() <= 20 && t.bytes().all(|b| b.is_ascii_digit());
        if !digits(seq) || !digits(idx) {
            return Err(bad());
        }
        Ok(Position {
            seq: seq.parse().map_err(|_| bad())?,
            idx: idx.parse().map_err(|_| bad())?,
        })
    }
}

/// What the position file holds.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
struct Stored {
    sink: String,
    source: String,
    position: String,
    updated: String,
}

/// The durable position of one at-least-once sink: `DIR/_sinks/NAME.position` (JSON,
/// replaced atomically and fsynced on every commit).
#[derive(Debug, Clone)]
pub struct PositionFile {
    path: PathBuf,
    sink: String,
    source: String,
}

impl PositionFile {
    /// The file of sink `sink` reading `source`, under the store root `root`.
    pub fn new(root: &Path, sink: &str, source: &str) -> PositionFile {
        PositionFile {
            path: root.join("_sinks").join(format!("{sink}.position")),
            sink: sink.to_string(),
            source: source.to_string(),
        }
    }

    /// The stored position; [`Position::START`] when there is none yet. Refuses a file
    /// of another source (the sink name was reused) or one that does not parse.
    pub fn load(&self) -> Result<Position, String> {
        let text = match std::fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Position::START),
            Err(e) => return Err(format!("reading {}: {e}", self.path.display())),
        };
        let st: Stored = serde_json::from_slice(&text)
            .map_err(|e| format!("{} is damaged ({e}); fix or remove it (the sink then starts at the oldest record held)", self.path.display()))?;
        if st.source != self.source {
            return Err(format!(
                "{} holds the position of source {} but sink {} reads source {}; pick another \
                 sink name, or remove the file to start the sink over",
                self.path.display(),
                st.source,
                self.sink,
                self.source
            ));
        }
        st.position
            .parse()
            .map_err(|e| format!("{}: {e}", self.path.display()))
    }

    /// Stores `pos` durably (blocking: call from a blocking thread).
    pub fn save(&self, pos: Position) -> Result<(), String> {
        let st = Stored {
            sink: self.sink.clone(),
            source: self.source.clone(),
            position: pos.to_string(),
            updated: now_rfc3339(),
        };
        let dir = self.path.parent().unwrap_or(Path::new("."));
        std::fs::create_dir_all(dir).map_err(|e| format!("creating {}: {e}", dir.display()))?;
        let mut body = serde_json::to_vec_pretty(&st).expect("plain strings");
        body.push(b'\n');
        routy_log::disk::write_atomic(&self.path, &body)
            .map_err(|e| format!("writing {}: {e}", self.path.display()))
    }
}

fn now_rfc3339() -> String {
    time::OffsetDateTime::now_utc()
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn positions_print_parse_and_order() {
        let p: Position = "1042.3".parse().unwrap();
        assert_eq!(p, Position::new(1042, 3));
        assert_eq!(p.to_string(), "1042.3");
        assert_eq!("7".parse::<Position>().unwrap(), Position::new(7, 0));
        for bad in [
            "",
            ".",
            "1.",
            ".2",
            "a.1",
            "1.2.3",
            "-1",
            "1.-2",
            "99999999999999999999999",
        ] {
            assert!(bad.parse::<Position>().is_err(), "{bad:?}");
        }
        assert!(Position::new(3, 9) < Position::new(4, 0));
        assert_eq!(Position::after_record(0), Position::START);
        assert_eq!(Position::after_record(5), Position::new(6, 0));
        assert_eq!(Position::new(6, 0).applied_seq(), 5);
        assert_eq!(Position::START.applied_seq(), 0);
    }

    #[test]
    fn the_file_round_trips_and_refuses_another_source() {
        let dir = tempfile::tempdir().unwrap();
        let f = PositionFile::new(dir.path(), "hook", "t/a");
        assert_eq!(f.load().unwrap(), Position::START);
        f.save(Position::new(12, 4)).unwrap();
        assert_eq!(f.load().unwrap(), Position::new(12, 4));
        let other = PositionFile::new(dir.path(), "hook", "t/b");
        let e = other.load().unwrap_err();
        assert!(e.contains("t/a") && e.contains("t/b"), "{e}");
        std::fs::write(dir.path().join("_sinks/hook.position"), b"{not json").unwrap();
        assert!(f.load().unwrap_err().contains("damaged"));
    }
}
