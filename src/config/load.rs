//! Loading: the built-in defaults, a TOML file, `KEYGATE__<SECTION>__<FIELD>` environment
//! variables and command-line flags, in rising precedence, merged as TOML values and
//! deserialised into [`Config`]. Each setting's [`Origin`] is recorded as the sources are
//! merged, so that every later error can say where its value came from. A mistake in one
//! setting does not stop loading: its entry is left out and its error kept, for every compile
//! step to report with its own.

use std::net::SocketAddr;
use std::path::Path;

use super::error::field_err;
use super::{Config, ConfigError, Origin, Origins, Override};

/// Environment variable prefix; `KEYGATE__SERVER__LISTEN` sets `server.listen`.
const ENV_PREFIX: &str = "KEYGATE__";

impl Config {
    /// Merges defaults, the file, the environment and flag overrides, in rising precedence.
    ///
    /// Only a file that cannot be read or parsed stops loading. Every other mistake (a
    /// variable that names no setting, an unknown field, a value of the wrong type, from any
    /// source) is kept in [`Config::load_errors`] with its entry left out, so that one run
    /// reports them all together with what compiling the rest finds.
    pub(crate) fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
        overrides: &[Override],
    ) -> Result<Config, ConfigError> {
        let mut m = Merge {
            defaults: toml::Value::try_from(Config::default()).expect("defaults serialise"),
            table: toml::Table::new(),
            origins: Origins::default(),
            errors: Vec::new(),
        };
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_owned(),
                source: source.into(),
            })?;
            m.table = toml::from_str(&text).map_err(|e| ConfigError::Syntax {
                path: path.to_owned(),
                message: e.to_string(),
            })?;
            m.origins
                .record_file("", &toml::Value::Table(m.table.clone()), path);
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
                m.errors.push(ConfigError::Env {
                    var,
                    message: "expected KEYGATE__<SECTION>__<FIELD>".into(),
                });
                continue;
            };
            if section == "routes" || section == "roles" {
                m.errors.push(ConfigError::Env {
                    message: format!("[{section}] can only be set in the config file"),
                    var,
                });
                continue;
            }
            let origin = Origin::Env(var.clone());
            m.put(section, field, &value, origin);
        }
        for (section, field, value) in overrides {
            m.put(
                section,
                field,
                value,
                Origin::Flag(flag_name(section, field)),
            );
        }
        Ok(m.deserialize())
    }
}

/// The sources merged so far: the table of settings, where each came from, and the mistakes
/// found on the way.
struct Merge {
    /// The defaults as TOML, by which a textual setting gets its type.
    defaults: toml::Value,
    table: toml::Table,
    origins: Origins,
    errors: Vec<ConfigError>,
}

impl Merge {
    /// Puts one textual setting (from the environment or a flag) into the table, typed as its
    /// default is, and records where it came from; a value that cannot take that type is kept
    /// as an error and leaves the table as it was.
    fn put(&mut self, section: &str, field: &str, value: &str, origin: Origin) {
        let path = format!("{section}.{field}");
        match typed_value(&self.defaults, section, field, value) {
            Ok(typed) => {
                set(&mut self.table, section, field, typed);
                self.origins.set(path, origin);
            }
            Err(message) => self.errors.push(ConfigError::Field {
                field: path,
                origin: Some(origin),
                message,
            }),
        }
    }

    /// Deserialises the table into a [`Config`], keeping an error for every entry that is not
    /// a setting or has the wrong type, instead of stopping at the first.
    ///
    /// Each failed attempt removes the entry at fault and tries again, so the loop ends: at
    /// worst when the table is empty, which deserialises to the defaults. The config returned
    /// is the one without the faulty entries, and carries their errors in
    /// [`Config::load_errors`], so that no compile step accepts it.
    fn deserialize(self) -> Config {
        let Merge {
            defaults,
            table,
            origins,
            mut errors,
        } = self;
        let mut table = toml::Value::Table(table);
        let mut config = loop {
            let e = match serde_path_to_error::deserialize(table.clone()) {
                Ok(config) => break config,
                Err(e) => e,
            };
            let field = e.path().to_string();
            let removed = remove(&mut table, e.path());
            // The parser's first line; the rest repeats the section (`in `cache``).
            let text = e.into_inner().to_string();
            let first = text.lines().next().unwrap_or_default().trim().to_owned();
            let message = type_message(&defaults, &field, first);
            errors.push(field_err(&field, message).located(&origins));
            if !removed {
                // Not an entry of the table (the parser's path names none): the error alone
                // keeps the config from being compiled.
                break Config::default();
            }
        };
        config.origins = origins;
        config.load_errors = errors;
        config
    }
}

/// Removes the setting `path` points into from `value`: the entry its last key names (for a
/// path into a list, such as `server.trusted_proxies[1]`, the whole list, so that the other
/// items keep their places). Returns whether there was one to remove.
fn remove(value: &mut toml::Value, path: &serde_path_to_error::Path) -> bool {
    use serde_path_to_error::Segment;
    fn walk(value: &mut toml::Value, path: &[&Segment]) -> bool {
        match path {
            [Segment::Map { key }] => value
                .as_table_mut()
                .is_some_and(|t| t.remove(key.as_str()).is_some()),
            [Segment::Map { key }, rest @ ..] => {
                value.get_mut(key.as_str()).is_some_and(|v| walk(v, rest))
            }
            [Segment::Seq { index }, rest @ ..] => {
                value.get_mut(*index).is_some_and(|v| walk(v, rest))
            }
            _ => false,
        }
    }
    let segments: Vec<&Segment> = path.iter().collect();
    match segments
        .iter()
        .rposition(|s| matches!(s, Segment::Map { .. }))
    {
        Some(last_key) => walk(value, &segments[..=last_key]),
        None => false,
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
