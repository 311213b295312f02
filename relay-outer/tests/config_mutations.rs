//! relay-outer's configuration parser on broken files: the deployed example mutated a few
//! hundred ways (bytes flipped, lines dropped or repeated, YAML syntax and odd values put
//! in), each checked with `relay-outer check-config`. Every file is accepted or refused
//! with a message; none makes the binary panic. relay-outer is a binary crate, so this runs
//! the binary; relay-inner's parser is fuzzed in process (fuzz/fuzz_targets/inner_config.rs).

use std::path::Path;
use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_relay-outer");

/// How many mutated files are checked (about 5 ms each).
const CASES: u64 = 250;

/// What gets put into a file: YAML structure, and values at the edges of what the fields
/// parse (durations, sizes, ports, addresses, numbers).
const TOKENS: &[&str] = &[
    "{",
    "}",
    "[",
    "]",
    ": ",
    "- ",
    "&a ",
    "*a",
    "<<: *a",
    "!!binary ",
    "!!str ",
    "~",
    "null",
    "'",
    "\"",
    "\\u0000",
    "\t",
    "#",
    "|",
    ">-",
    "---\n",
    "...\n",
    "? ",
    "0x10",
    "-1",
    "0",
    "65536",
    "99999999999999999999",
    "1e400",
    "NaN",
    "0s",
    "1ns",
    "18446744073709551615s",
    "10GiB",
    "16EiB",
    "0B",
    "999999999999TiB",
    "[::1]:0",
    "0.0.0.0:",
    "1.2.3.4:99999",
    "é",
    "\u{feff}",
    "\u{0}",
    "true",
    "yes",
    "",
    " ",
];

/// A small deterministic generator (xorshift64*): the same cases on every run.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) % n.max(1) as u64) as usize
    }
}

/// One to three mutations of `base`.
fn mutate(base: &[u8], rng: &mut Rng) -> Vec<u8> {
    let mut out = base.to_vec();
    for _ in 0..=rng.below(3) {
        let lines: Vec<&[u8]> = out.split_inclusive(|&b| b == b'\n').collect();
        let at = rng.below(out.len() + 1);
        out = match rng.below(6) {
            0 if !out.is_empty() => {
                let mut o = out.clone();
                o[at.min(out.len() - 1)] ^= 1 << rng.below(8);
                o
            }
            1 => {
                let drop = rng.below(lines.len());
                lines
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != drop)
                    .flat_map(|(_, l)| l.iter().copied())
                    .collect()
            }
            2 => {
                let twice = rng.below(lines.len());
                lines
                    .iter()
                    .enumerate()
                    .flat_map(|(i, l)| {
                        let n = if i == twice { 2 } else { 1 };
                        std::iter::repeat_n(*l, n).flatten().copied()
                    })
                    .collect()
            }
            3 => out[..at].to_vec(),
            // A value replaced: after a `: `, up to the end of the line or a comma.
            4 => {
                let text = String::from_utf8_lossy(&out).into_owned();
                let colons: Vec<usize> = text.match_indices(": ").map(|(i, _)| i + 2).collect();
                if colons.is_empty() {
                    out
                } else {
                    let start = colons[rng.below(colons.len())];
                    let end = text[start..]
                        .find([',', '\n', '}'])
                        .map_or(text.len(), |e| start + e);
                    let token = TOKENS[rng.below(TOKENS.len())];
                    format!("{}{token}{}", &text[..start], &text[end..]).into_bytes()
                }
            }
            _ => {
                let mut o = out[..at].to_vec();
                o.extend_from_slice(TOKENS[rng.below(TOKENS.len())].as_bytes());
                o.extend_from_slice(&out[at..]);
                o
            }
        };
    }
    out
}

#[test]
fn mutated_config_files_are_refused_with_a_reason_never_a_panic() {
    let base =
        std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/relay-outer.yaml"))
            .unwrap();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay-outer.yaml");
    let mut rng = Rng(0x5eed_0fc0_ffee);
    let mut refused = 0;
    for case in 0..CASES {
        let file = mutate(&base, &mut rng);
        std::fs::write(&path, &file).unwrap();
        let out = Command::new(BIN)
            .args(["check-config", "--config"])
            .arg(&path)
            .output()
            .unwrap();
        let stderr = String::from_utf8_lossy(&out.stderr);
        let shown = String::from_utf8_lossy(&file);
        assert!(
            !stderr.contains("panicked") && out.status.code().is_some_and(|c| c != 101),
            "case {case}: relay-outer panicked on this file:\n{shown}\n--- stderr:\n{stderr}"
        );
        if !out.status.success() {
            assert!(
                !stderr.trim().is_empty(),
                "case {case}: refused without a reason"
            );
            refused += 1;
        }
    }
    // The deployed example names certificate files that do not exist here, so every case
    // is refused, by the parser, the validation or the TLS check.
    assert_eq!(refused, CASES);
}
