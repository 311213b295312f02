//! Reading either relay's YAML configuration file: unknown keys are rejected by the
//! types, and every error names the file.

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

/// A configuration that could not be loaded, naming the file and the field.
#[derive(Debug, thiserror::Error)]
#[error("{path}: {message}")]
pub struct ConfigError {
    path: PathBuf,
    message: String,
}

impl ConfigError {
    /// An error about the file at `path`.
    pub fn new(path: &Path, message: impl Into<String>) -> Self {
        ConfigError {
            path: path.to_owned(),
            message: message.into(),
        }
    }
}

/// Reads and parses `path`, then validates it with `validate`, which gets the file's
/// directory (relative paths in the file are resolved against it).
pub fn load<R, T>(
    path: &Path,
    validate: impl FnOnce(R, &Path) -> Result<T, String>,
) -> Result<T, ConfigError>
where
    R: DeserializeOwned,
{
    let text = std::fs::read_to_string(path)
        .map_err(|e| ConfigError::new(path, format!("cannot read: {e}")))?;
    let raw: R = serde_saphyr::from_str(&text).map_err(|e| {
        // The parser's message starts with its own "error: "; ours already says it.
        let m = e.to_string();
        let m = m.strip_prefix("error: ").map(str::to_owned).unwrap_or(m);
        ConfigError::new(path, m)
    })?;
    let base = path.parent().unwrap_or(Path::new("."));
    validate(raw, base).map_err(|m| ConfigError::new(path, m))
}

/// A reload's check of a setting that takes effect only at start: the refusal, naming
/// `key` and both values, when it changed.
pub fn restart_needed<T: PartialEq + std::fmt::Display>(
    key: &str,
    old: &T,
    new: &T,
) -> Result<(), String> {
    if old == new {
        Ok(())
    } else {
        Err(format!(
            "{key} changed from {old} to {new}: that needs a restart"
        ))
    }
}

/// A key that takes one value or a list of them (`crl: a.pem` or `crl: [a.pem, b.pem]`).
#[derive(Debug, Clone, PartialEq, Eq, serde::Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    /// A single value.
    One(T),
    /// A list.
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    /// The values as a list.
    pub fn into_vec(self) -> Vec<T> {
        match self {
            OneOrMany::One(v) => vec![v],
            OneOrMany::Many(v) => v,
        }
    }
}

#[cfg(test)]
mod one_or_many_tests {
    use super::OneOrMany;

    #[test]
    fn one_value_or_a_list() {
        let one: OneOrMany<String> = serde_saphyr::from_str("a.pem").unwrap();
        assert_eq!(one.into_vec(), vec!["a.pem"]);
        let many: OneOrMany<String> = serde_saphyr::from_str("[a.pem, b.pem]").unwrap();
        assert_eq!(many.into_vec(), vec!["a.pem", "b.pem"]);
        assert!(serde_saphyr::from_str::<OneOrMany<String>>("{x: 1}").is_err());
    }
}
