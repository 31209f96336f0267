//! Reading a daemon's TOML file the way both daemons do: every problem reported at once, each
//! naming its key (unknown keys included, all of them), so an operator fixes a file in one pass.

use std::fmt;

use serde::de::DeserializeOwned;

/// One configuration problem, naming the key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigProblem {
    /// The key (or `config` for the file as a whole).
    pub key: String,
    /// What is wrong.
    pub message: String,
}

/// Every problem found in a configuration.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigError {
    /// The problems, in the order found.
    pub problems: Vec<ConfigProblem>,
}

/// The problems found so far.
#[derive(Debug, Default)]
pub struct Problems(Vec<ConfigProblem>);

// === impl ConfigError ===

impl ConfigError {
    /// For a value that is missing although no problem was recorded for it: a checker's bug,
    /// reported rather than panicked on.
    pub fn incomplete() -> Self {
        Self {
            problems: vec![ConfigProblem {
                key: "config".to_owned(),
                message: "incomplete configuration".to_owned(),
            }],
        }
    }
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let n = self.problems.len();
        write!(
            f,
            "invalid configuration ({n} problem{}):",
            if n == 1 { "" } else { "s" }
        )?;
        for p in &self.problems {
            write!(f, "\n  {}: {}", p.key, p.message)?;
        }
        Ok(())
    }
}

// === impl Problems ===

impl Problems {
    /// Records a problem with `key`.
    pub fn push(&mut self, key: &str, message: impl Into<String>) {
        self.0.push(ConfigProblem {
            key: key.to_owned(),
            message: message.into(),
        });
    }

    /// The value, or `None` with the error recorded against `key`.
    pub fn check<T, E: fmt::Display>(&mut self, key: &str, result: Result<T, E>) -> Option<T> {
        result.map_err(|e| self.push(key, e.to_string())).ok()
    }

    /// True when nothing was recorded.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// `Ok` when nothing was recorded, else every problem.
    ///
    /// # Errors
    ///
    /// [`ConfigError`] with every problem recorded.
    pub fn into_result(self) -> Result<(), ConfigError> {
        if self.0.is_empty() {
            Ok(())
        } else {
            Err(ConfigError { problems: self.0 })
        }
    }
}

/// Parses a TOML file into `T`, recording every unknown key (any not in `known`) and every key
/// whose value has the wrong type, each against its key; the keys that are fine are kept, so
/// the caller can still check them all.
pub fn parse_file<T: DeserializeOwned + Default>(
    text: &str,
    known: &[&str],
    problems: &mut Problems,
) -> T {
    let table: toml::Table = match toml::from_str(text) {
        Ok(table) => table,
        Err(e) => {
            problems.push("config", format!("not valid TOML: {}", e.message()));
            return T::default();
        }
    };
    let mut good = toml::Table::new();
    for (key, value) in table {
        if !known.contains(&key.as_str()) {
            problems.push(&key, "unknown key");
            continue;
        }
        // Key by key, so that one wrong type does not hide the others.
        let one: toml::Table = [(key.clone(), value.clone())].into_iter().collect();
        match one.try_into::<T>() {
            Ok(_) => {
                good.insert(key, value);
            }
            Err(e) => problems.push(&key, e.message().to_owned()),
        }
    }
    match good.try_into::<T>() {
        Ok(config) => config,
        Err(e) => {
            problems.push("config", e.message().to_owned());
            T::default()
        }
    }
}

/// `metrics_address` and `health_address`, each checked by [`listener_address`].
pub fn telemetry_addresses(
    problems: &mut Problems,
    metrics: Option<&str>,
    health: Option<&str>,
) -> (Option<std::net::SocketAddr>, Option<std::net::SocketAddr>) {
    (
        listener_address(problems, "metrics_address", metrics),
        listener_address(problems, "health_address", health),
    )
}

/// An optional listener address (`metrics_address`, `health_address`): `IP:PORT`, or why
/// not. Every problem is pushed onto `problems` under `key`.
pub fn listener_address(
    problems: &mut Problems,
    key: &'static str,
    text: Option<&str>,
) -> Option<std::net::SocketAddr> {
    let text = text?;
    problems.check(
        key,
        text.parse::<std::net::SocketAddr>()
            .map_err(|e| format!("{e} (write it as IP:PORT, e.g. 127.0.0.1:9988)")),
    )
}

#[cfg(test)]
mod tests {
    use serde::Deserialize;

    use super::*;

    #[derive(Debug, Default, Deserialize, PartialEq)]
    #[serde(deny_unknown_fields)]
    struct File {
        name: Option<String>,
        port: Option<u16>,
        on: Option<bool>,
    }

    const KNOWN: &[&str] = &["name", "port", "on"];

    #[test]
    fn every_unknown_key_and_every_bad_value_is_reported_and_the_rest_kept() {
        let mut problems = Problems::default();
        let file: File = parse_file(
            "name = \"a\"\nport = \"eighty\"\ncolour = 1\nsize = 2\non = true",
            KNOWN,
            &mut problems,
        );
        assert_eq!(
            file,
            File {
                name: Some("a".into()),
                port: None,
                on: Some(true),
            }
        );
        let err = problems.into_result().unwrap_err();
        let keys: Vec<&str> = err.problems.iter().map(|p| p.key.as_str()).collect();
        assert_eq!(keys, ["colour", "port", "size"]);
        assert!(err.problems[0].message.contains("unknown key"));
        assert!(
            err.to_string()
                .starts_with("invalid configuration (3 problems):")
        );
    }

    #[test]
    fn not_toml_is_one_problem_about_the_file() {
        let mut problems = Problems::default();
        let file: File = parse_file("name = ", KNOWN, &mut problems);
        assert_eq!(file, File::default());
        let err = problems.into_result().unwrap_err();
        assert_eq!(err.problems.len(), 1);
        assert_eq!(err.problems[0].key, "config");
    }
}
