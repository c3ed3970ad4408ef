//! What can be wrong with a configuration, and where each setting came from: [`ConfigError`]
//! names the field and its [`Origin`] (the file, an environment variable, a flag); [`Origins`]
//! remembers the origin of every setting the operator gave; `Check` collects every error of a
//! validation instead of stopping at the first.

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;

/// A configuration problem, naming the field (or file, or variable) at fault.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (printed as the cause, after this error's own message).
        #[source]
        source: Arc<std::io::Error>,
    },
    /// The config file is not valid TOML.
    #[error("config file {path}: {message}")]
    Syntax {
        /// The file.
        path: PathBuf,
        /// The parser's message, with line and column.
        message: String,
    },
    /// An environment variable does not name a setting.
    #[error("{var} (environment): {message}")]
    Env {
        /// The variable.
        var: String,
        /// Why it was refused.
        message: String,
    },
    /// A setting has a wrong type or value.
    #[error("{field}{}: {message}", OriginSuffix(origin.as_ref()))]
    Field {
        /// Dotted path of the setting, e.g. `upstream.url`.
        field: String,
        /// Where its value came from; `None` for a default (or a value set in code).
        origin: Option<Origin>,
        /// What is wrong with it.
        message: String,
    },
    /// Several settings are wrong: each error on its own line.
    #[error("{} problems in the configuration:\n  {}", .0.len(), ManyLines(.0))]
    Many(Vec<ConfigError>),
}

impl ConfigError {
    /// The errors this one stands for: itself, or each of [`ConfigError::Many`].
    pub fn errors(&self) -> Vec<&ConfigError> {
        match self {
            ConfigError::Many(all) => all.iter().collect(),
            one => vec![one],
        }
    }

    /// The setting at fault, for an error about one.
    fn field(&self) -> Option<&str> {
        match self {
            ConfigError::Field { field, .. } => Some(field),
            _ => None,
        }
    }

    /// Names where the value came from, looked up in `origins` if not known yet.
    pub(super) fn located(self, origins: &Origins) -> Self {
        match self {
            ConfigError::Field {
                field,
                origin: None,
                message,
            } => ConfigError::Field {
                origin: origins.of(&field).cloned(),
                field,
                message,
            },
            ConfigError::Many(all) => {
                ConfigError::Many(all.into_iter().map(|e| e.located(origins)).collect())
            }
            other => other,
        }
    }
}

struct OriginSuffix<'a>(Option<&'a Origin>);

impl fmt::Display for OriginSuffix<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            Some(origin) => write!(f, " ({origin})"),
            None => Ok(()),
        }
    }
}

struct ManyLines<'a>(&'a [ConfigError]);

impl fmt::Display for ManyLines<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, e) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str("\n  ")?;
            }
            write!(f, "{e}")?;
        }
        Ok(())
    }
}

/// An error in the setting at `field`, its origin to be looked up later.
pub(super) fn field_err(field: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Field {
        field: field.to_owned(),
        origin: None,
        message: message.into(),
    }
}

/// Where a setting's value came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Origin {
    /// The config file (`--config`).
    File(PathBuf),
    /// An environment variable, e.g. `KEYGATE__CACHE__TTL`.
    Env(String),
    /// A command-line flag, e.g. `--listen`.
    Flag(String),
}

impl fmt::Display for Origin {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Origin::File(path) => write!(f, "config file {}", path.display()),
            Origin::Env(var) => write!(f, "environment variable {var}"),
            Origin::Flag(flag) => write!(f, "flag {flag}"),
        }
    }
}

/// Where each setting the operator gave came from, by dotted path (`cache.ttl`,
/// `routes[0].upstream`), the source that won; built while loading. A setting that is not
/// here has its default (or was set in code).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins(BTreeMap<String, Origin>);

impl Origins {
    /// Records where `path` came from (a later source replaces an earlier one).
    pub(crate) fn set(&mut self, path: impl Into<String>, origin: Origin) {
        self.0.insert(path.into(), origin);
    }

    /// Where the value of `field` came from: its own entry, else that of the setting it is part
    /// of (`routes[0].roles[1]` is part of `routes[0].roles`), else that of a setting within it
    /// (`roles.x` holds `roles.x.methods`).
    pub(crate) fn of(&self, field: &str) -> Option<&Origin> {
        let mut path = field;
        loop {
            if let Some(o) = self.0.get(path) {
                return Some(o);
            }
            match path.rfind(['.', '[']) {
                Some(at) if at > 0 => path = &path[..at],
                _ => break,
            }
        }
        self.0
            .range(field.to_owned()..)
            .take_while(|(k, _)| k.starts_with(field))
            .find(|(k, _)| k[field.len()..].starts_with(['.', '[']))
            .map(|(_, o)| o)
    }
}

/// Collects every error of a validation instead of stopping at the first, each with where its
/// value came from.
///
/// It starts with the errors found while loading (whose entries were left out, so that what
/// is left could still be compiled): a validation can therefore never succeed on a config
/// with a mistake in it, whichever part of it a command compiles.
pub(super) struct Check<'a> {
    origins: &'a Origins,
    errors: Vec<ConfigError>,
}

impl<'a> Check<'a> {
    /// A check that has already seen `load_errors`.
    pub(super) fn new(origins: &'a Origins, load_errors: &[ConfigError]) -> Self {
        Check {
            origins,
            errors: load_errors.to_vec(),
        }
    }

    /// The value, or `None` with its error kept: one error per setting, the first found.
    /// `upstream.url` and the roles are checked by two validations; and a setting left out
    /// while loading is checked again at its default, as part of the setting that holds it
    /// (`roles.x` without its `methods`): what that finds is only a consequence.
    pub(super) fn ok<T>(&mut self, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| {
            let e = e.located(self.origins);
            let text = e.to_string();
            let seen = self
                .errors
                .iter()
                .any(|seen| match (seen.field(), e.field()) {
                    (Some(a), Some(b)) => a == b || part_of(a, b) || part_of(b, a),
                    _ => seen.to_string() == text,
                });
            if !seen {
                self.errors.push(e);
            }
        })
        .ok()
    }

    /// Every error seen; `build` runs only when there were none, so each value it takes is
    /// present.
    pub(super) fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, ConfigError> {
        let mut errors = self.errors;
        match errors.len() {
            0 => build().ok_or_else(|| field_err("config", "incomplete validation")),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }
}

/// Whether the setting `part` is within `whole` (`roles.x.methods` within `roles.x`,
/// `routes[0].host` within `routes[0]`).
fn part_of(part: &str, whole: &str) -> bool {
    part.strip_prefix(whole)
        .is_some_and(|rest| rest.starts_with(['.', '[']))
}
