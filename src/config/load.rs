//! Loading: the built-in defaults, a TOML file, `KEYGATE__<SECTION>__<FIELD>` environment
//! variables and command-line flags, in rising precedence, merged as TOML values and
//! deserialised into [`Config`]. Each setting's [`Origin`] is recorded as the sources are
//! merged, so that every later error can say where its value came from.

use std::net::SocketAddr;
use std::path::Path;

use super::error::field_err;
use super::{Config, ConfigError, Origin, Origins, Override};

/// Environment variable prefix; `KEYGATE__SERVER__LISTEN` sets `server.listen`.
const ENV_PREFIX: &str = "KEYGATE__";

impl Config {
    /// Merges defaults, the file, the environment and flag overrides, in rising precedence.
    pub(crate) fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[Override],
    ) -> Result<Config, ConfigError> {
        let defaults = toml::Value::try_from(Config::default()).expect("defaults serialise");
        let mut merged = toml::Table::new();
        let mut origins = Origins::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source,
            })?;
            merged = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            origins.record_file("", &toml::Value::Table(merged.clone()), path);
        }
        let mut env: Vec<(String, String)> = env
            .into_iter()
            .filter(|(k, _)| k.starts_with(ENV_PREFIX))
            .collect();
        env.sort();
        for (var, value) in env {
            let path: Vec<String> = var[ENV_PREFIX.len()..]
                .split("__")
                .map(str::to_ascii_lowercase)
                .collect();
            let [section, field] = path.as_slice() else {
                return Err(ConfigError::Env {
                    var,
                    message: "expected KEYGATE__<SECTION>__<FIELD>".into(),
                });
            };
            if section == "routes" || section == "roles" {
                return Err(ConfigError::Env {
                    var,
                    message: format!("[{section}] can only be set in the config file"),
                });
            }
            let origin = Origin::Env(var.clone());
            let path = format!("{section}.{field}");
            let typed = typed_value(&defaults, section, field, &value).map_err(|message| {
                ConfigError::Field {
                    field: path.clone(),
                    origin: Some(origin.clone()),
                    message,
                }
            })?;
            set(&mut merged, section, field, typed);
            origins.set(path, origin);
        }
        for (section, field, value) in overrides {
            let origin = Origin::Flag(flag_name(section, field));
            let path = format!("{section}.{field}");
            let typed = typed_value(&defaults, section, field, value).map_err(|message| {
                ConfigError::Field {
                    field: path.clone(),
                    origin: Some(origin.clone()),
                    message,
                }
            })?;
            set(&mut merged, section, field, typed);
            origins.set(path, origin);
        }
        let mut config: Config = serde_path_to_error::deserialize(toml::Value::Table(merged))
            .map_err(|e| {
                let field = e.path().to_string();
                // The parser's first line; the rest repeats the section (`in `cache``).
                let text = e.into_inner().to_string();
                let first = text.lines().next().unwrap_or_default().trim().to_owned();
                let message = type_message(&defaults, &field, first);
                field_err(&field, message).located(&origins)
            })?;
        config.origins = origins;
        Ok(config)
    }
}

/// Puts `value` at `section.field` in the merged table.
fn set(table: &mut toml::Table, section: &str, field: &str, value: toml::Value) {
    let entry = table
        .entry(section.to_owned())
        .or_insert_with(|| toml::Value::Table(toml::Table::new()));
    if let toml::Value::Table(t) = entry {
        t.insert(field.to_owned(), value);
    } else {
        *entry = toml::Value::Table(toml::Table::from_iter([(field.to_owned(), value)]));
    }
}

/// The flag that sets `section.field` (`--listen`, `--upstream`, `--redis-url`, …).
fn flag_name(section: &str, field: &str) -> String {
    match (section, field) {
        ("upstream", "url") => "--upstream".into(),
        _ => format!("--{}", field.replace('_', "-")),
    }
}

/// A deserialiser's message for `field`, with a wrong type explained by the kind of value the
/// setting takes (`expected a duration such as "60s", found integer `60``), from its default.
fn type_message(defaults: &toml::Value, field: &str, message: String) -> String {
    let Some(found) = message
        .strip_prefix("invalid type: ")
        .and_then(|m| m.rsplit_once(", expected "))
        .map(|(found, _)| found)
    else {
        return message;
    };
    let default = field
        .split_once('.')
        .and_then(|(section, name)| defaults.get(section)?.get(name));
    let expected = match default {
        Some(toml::Value::String(d)) if humantime::parse_duration(d).is_ok() => {
            format!("a duration such as {d:?} (a number and a unit: 500ms, 30s, 5m, 1d)")
        }
        Some(toml::Value::String(d)) if d.parse::<SocketAddr>().is_ok() => {
            format!("an address such as {d:?}")
        }
        Some(toml::Value::String(d)) => format!("a string such as {d:?}"),
        Some(toml::Value::Integer(d)) => format!("a whole number such as {d}"),
        Some(toml::Value::Boolean(_)) => "true or false".into(),
        _ => return message,
    };
    format!("expected {expected}, found {found}")
}

/// Turns a textual setting (from the environment or a flag) into the type the default has, so
/// `KEYGATE__CACHE__CAPACITY=10` is an integer and `KEYGATE__STORE__NAMESPACE=10` a string.
fn typed_value(
    defaults: &toml::Value,
    section: &str,
    field: &str,
    raw: &str,
) -> Result<toml::Value, String> {
    let Some(section_defaults) = defaults.get(section) else {
        return Err(format!("no section [{section}]"));
    };
    match section_defaults.get(field) {
        Some(toml::Value::Integer(_)) => raw
            .parse::<i64>()
            .map(toml::Value::Integer)
            .map_err(|_| format!("{raw:?} is not an integer")),
        Some(toml::Value::Boolean(_)) => raw
            .parse::<bool>()
            .map(toml::Value::Boolean)
            .map_err(|_| format!("{raw:?} is not true or false")),
        // Lists, e.g. `KEYGATE__SERVER__TRUSTED_PROXIES=10.0.0.0/8,fd00::/8`.
        Some(toml::Value::Array(_)) => Ok(toml::Value::Array(
            raw.split(',')
                .map(str::trim)
                .filter(|item| !item.is_empty())
                .map(|item| toml::Value::String(item.to_owned()))
                .collect(),
        )),
        // Strings, and optional settings that default to unset.
        _ => Ok(toml::Value::String(raw.to_owned())),
    }
}

impl Origins {
    /// Records every setting in `value` (a table of the file) under `prefix`.
    fn record_file(&mut self, prefix: &str, value: &toml::Value, file: &Path) {
        match value {
            toml::Value::Table(t) => {
                for (k, v) in t {
                    let path = if prefix.is_empty() {
                        k.clone()
                    } else {
                        format!("{prefix}.{k}")
                    };
                    self.record_file(&path, v, file);
                }
            }
            toml::Value::Array(items) if items.iter().all(toml::Value::is_table) => {
                self.set(prefix, Origin::File(file.to_owned()));
                for (i, v) in items.iter().enumerate() {
                    self.record_file(&format!("{prefix}[{i}]"), v, file);
                }
            }
            _ => self.set(prefix, Origin::File(file.to_owned())),
        }
    }
}
