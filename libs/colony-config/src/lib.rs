//! Layered configuration for every Colony binary: defaults → TOML file → environment → overrides,
//! then validation, failing fast before any port is bound or connection made.

use std::collections::HashMap;
use std::path::PathBuf;

use serde::de::DeserializeOwned;

pub use secrecy::{ExposeSecret, SecretString};

/// Why a configuration could not be loaded. Every variant names what to fix.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("cannot read config file {path}: {source}")]
    File {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("invalid configuration: {0}")]
    Parse(String),
    #[error("invalid configuration:\n  - {}", .0.join("\n  - "))]
    Invalid(Vec<String>),
}

/// Checks that go beyond types: ranges, cross-field rules, references between sections.
pub trait Validate {
    /// Pushes one human-readable message per problem into `problems`.
    fn validate(&self, problems: &mut Vec<String>);
}

/// Where configuration comes from. Tests build this by hand so they never touch the process
/// environment; binaries use [`Sources::from_process`].
#[derive(Debug, Clone, Default)]
pub struct Sources {
    pub file: Option<PathBuf>,
    pub env: HashMap<String, String>,
    /// `key.path=value` pairs applied last (for example from `--set`).
    pub overrides: Vec<(String, String)>,
}

impl Sources {
    /// Exactly these environment variables, no file (how tests build their sources).
    pub fn from_env_pairs<'a>(pairs: impl IntoIterator<Item = &'a (&'a str, &'a str)>) -> Self {
        Self {
            env: pairs
                .into_iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Self::default()
        }
    }

    /// The process environment plus an optional file.
    pub fn from_process(file: Option<PathBuf>) -> Self {
        Self {
            file,
            env: std::env::vars().collect(),
            overrides: Vec::new(),
        }
    }
}

/// Loads `T` for the service whose environment prefix is `prefix` (for example `ROUTER`, read
/// as `ROUTER__DATABASE__URL` → `database.url`).
pub fn load<T>(prefix: &str, sources: &Sources) -> Result<T, Error>
where
    T: DeserializeOwned + Validate,
{
    let mut builder = config::Config::builder();
    if let Some(path) = &sources.file {
        let text = std::fs::read_to_string(path).map_err(|source| Error::File {
            path: path.clone(),
            source,
        })?;
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }
    builder = builder.add_source(
        config::Environment::with_prefix(prefix)
            .prefix_separator("__")
            .separator("__")
            .try_parsing(true)
            .list_separator(",")
            .with_list_parse_key("roles")
            .source(Some(sources.env.clone())),
    );
    for (key, value) in &sources.overrides {
        builder = builder
            .set_override(key.as_str(), value.as_str())
            .map_err(|e| Error::Parse(e.to_string()))?;
    }
    let config = builder.build().map_err(|e| Error::Parse(e.to_string()))?;
    let value: T = config
        .try_deserialize()
        .map_err(|e| Error::Parse(e.to_string()))?;
    let mut problems = Vec::new();
    value.validate(&mut problems);
    if problems.is_empty() {
        Ok(value)
    } else {
        Err(Error::Invalid(problems))
    }
}

/// Environment variables carrying `prefix` that a loaded config would consume. Used by the
/// compose check to prove that every variable it sets is one the service reads.
pub fn env_keys<'a>(prefix: &str, env: impl IntoIterator<Item = &'a str>) -> Vec<String> {
    let marker = format!("{prefix}__");
    env.into_iter()
        .filter(|key| key.starts_with(&marker))
        .map(str::to_owned)
        .collect()
}

/// Serialises a config for the start-up log. Secrets are `SecretString`, which serialises as
/// `[REDACTED]`, so the output is safe to log.
pub fn redacted_json<T: serde::Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_else(|e| format!("<unserialisable config: {e}>"))
}

/// Serde helper: serialise a secret as a fixed marker, never its value.
pub mod secret {
    use secrecy::SecretString;
    use serde::Serializer;

    pub fn serialize<S: Serializer>(_: &SecretString, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str("[REDACTED]")
    }

    pub fn serialize_opt<S: Serializer>(
        value: &Option<SecretString>,
        serializer: S,
    ) -> Result<S::Ok, S::Error> {
        match value {
            Some(_) => serializer.serialize_str("[REDACTED]"),
            None => serializer.serialize_none(),
        }
    }
}

/// Checks that `addr` parses as a socket address.
pub fn check_socket_addr(problems: &mut Vec<String>, key: &str, addr: &str) {
    if addr.parse::<std::net::SocketAddr>().is_err() {
        problems.push(format!(
            "{key}: {addr:?} is not a socket address like 0.0.0.0:8080"
        ));
    }
}

/// Checks that `url` starts with one of `schemes`.
pub fn check_url(problems: &mut Vec<String>, key: &str, url: &str, schemes: &[&str]) {
    if !schemes.iter().any(|s| url.starts_with(&format!("{s}://"))) {
        problems.push(format!(
            "{key}: {url:?} must start with one of {}",
            schemes
                .iter()
                .map(|s| format!("{s}://"))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;
    use std::time::Duration;

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields, default)]
    struct Sample {
        name: String,
        slots: u32,
        #[serde(with = "humantime_serde")]
        lease: Duration,
        nested: Nested,
        roles: Vec<String>,
    }

    #[derive(Debug, Deserialize, Default)]
    #[serde(deny_unknown_fields, default)]
    struct Nested {
        url: String,
    }

    impl Default for Sample {
        fn default() -> Self {
            Self {
                name: "default".into(),
                slots: 4,
                lease: Duration::from_secs(30),
                nested: Nested::default(),
                roles: vec!["generalist".into()],
            }
        }
    }

    impl Validate for Sample {
        fn validate(&self, problems: &mut Vec<String>) {
            if self.slots == 0 {
                problems.push("slots: must be at least 1".into());
            }
        }
    }

    fn env(pairs: &[(&str, &str)]) -> Sources {
        Sources::from_env_pairs(pairs)
    }

    #[test]
    fn environment_overrides_defaults_and_nests() {
        let sample: Sample = load(
            "SVC",
            &env(&[
                ("SVC__SLOTS", "8"),
                ("SVC__LEASE", "250ms"),
                ("SVC__NESTED__URL", "nats://x:4222"),
                ("SVC__ROLES", "a,b"),
                ("OTHER__SLOTS", "1"),
            ]),
        )
        .unwrap();
        assert_eq!(sample.slots, 8);
        assert_eq!(sample.lease, Duration::from_millis(250));
        assert_eq!(sample.nested.url, "nats://x:4222");
        assert_eq!(sample.roles, vec!["a", "b"]);
        assert_eq!(sample.name, "default");
    }

    #[test]
    fn file_then_env_then_override() {
        let dir = std::env::temp_dir().join(format!("colony-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("svc.toml");
        std::fs::write(&path, "name = \"file\"\nslots = 2\n[nested]\nurl = \"a\"\n").unwrap();
        let mut sources = env(&[("SVC__SLOTS", "3")]);
        sources.file = Some(path);
        sources.overrides.push(("nested.url".into(), "b".into()));
        let sample: Sample = load("SVC", &sources).unwrap();
        assert_eq!(
            (
                sample.name.as_str(),
                sample.slots,
                sample.nested.url.as_str()
            ),
            ("file", 3, "b")
        );
    }

    #[test]
    fn unknown_keys_and_bad_values_fail_fast() {
        let unknown = load::<Sample>("SVC", &env(&[("SVC__SLOTZ", "3")])).unwrap_err();
        assert!(unknown.to_string().contains("slotz"), "{unknown}");
        let bad = load::<Sample>("SVC", &env(&[("SVC__LEASE", "soon")])).unwrap_err();
        assert!(bad.to_string().contains("lease"), "{bad}");
        let invalid = load::<Sample>("SVC", &env(&[("SVC__SLOTS", "0")])).unwrap_err();
        assert!(
            matches!(invalid, Error::Invalid(ref p) if p.len() == 1),
            "{invalid}"
        );
    }

    #[test]
    fn missing_file_names_the_path() {
        let sources = Sources {
            file: Some("/nonexistent/colony.toml".into()),
            ..Sources::default()
        };
        let error = load::<Sample>("SVC", &sources).unwrap_err();
        assert!(error.to_string().contains("/nonexistent/colony.toml"));
    }
}
