//! Every committed fuzz input (`fuzz/corpus/TARGET/*`) through its target, on every
//! `cargo test`: an input that once crashed a decoder (each crash found is added to the
//! corpus) stays a regression test, without libFuzzer or its instrumented build.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::{Path, PathBuf};

use routy_fuzz_targets::{remove_scratch, TARGETS};

fn fuzz_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

/// The names of the entries of `dir` (files or directories), sorted.
fn names(dir: &Path, suffix: &str) -> Vec<String> {
    let mut out: Vec<String> = std::fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.expect("the directory lists").file_name())
        .filter_map(|n| n.to_str()?.strip_suffix(suffix).map(str::to_owned))
        .collect();
    out.sort();
    out
}

#[test]
fn every_target_has_a_binary_and_a_corpus() {
    let mut targets: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    targets.sort();
    assert_eq!(names(&fuzz_dir().join("fuzz_targets"), ".rs"), targets);
    assert_eq!(names(&fuzz_dir().join("corpus"), ""), targets);
    let manifest = std::fs::read_to_string(fuzz_dir().join("Cargo.toml")).unwrap();
    for t in &targets {
        assert!(
            manifest.contains(&format!("name = \"{t}\"")),
            "fuzz/Cargo.toml declares no [[bin]] {t}"
        );
    }
}

#[test]
fn every_corpus_input_runs_through_its_target_without_a_panic() {
    let mut failures = Vec::new();
    let mut inputs = 0;
    for (name, run) in TARGETS {
        let dir = fuzz_dir().join("corpus").join(name);
        let files = names(&dir, "");
        assert!(!files.is_empty(), "{}: no inputs", dir.display());
        for file in files {
            let path = dir.join(&file);
            let data = std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
            inputs += 1;
            if catch_unwind(AssertUnwindSafe(|| run(&data))).is_err() {
                let head: String = data.iter().take(32).map(|b| format!("{b:02x}")).collect();
                failures.push(format!(
                    "{name}: {} ({} bytes, starting {head}); reproduce with fuzz/run's build: \
                     target/fuzz/*/release/{name} {}",
                    path.display(),
                    data.len(),
                    path.display()
                ));
            }
        }
    }
    remove_scratch();
    assert!(
        failures.is_empty(),
        "{} of {inputs} corpus inputs panicked (the panics are printed above):\n{}",
        failures.len(),
        failures.join("\n")
    );
    assert!(
        inputs > 1000,
        "the committed corpus is there ({inputs} inputs)"
    );
}
