//! Configuration: read once, validated once, turned into the runtime's own types.
//!
//! Sources, lowest precedence first: built-in defaults, a TOML file (`--config`), environment
//! variables `KEYGATE__<SECTION>__<FIELD>`, and command-line flags. They are merged as TOML
//! values and deserialised with `deny_unknown_fields`, so a misspelt field is an error that names
//! it. [`Config::serve_settings`] then checks every value and builds [`Settings`]: parsed
//! addresses, durations, URIs and header names, so nothing on the request path parses config.
//!
//! Every error names its field and, when the operator set it, where the value came from (the
//! file, the environment variable, or the flag): [`Config::load`] records each setting's
//! [`Origin`] as it merges the sources, and validation looks the field up there.
//! [`Config::serve_settings`] reports every invalid setting at once, not only the first.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderValue, Uri};
use serde::{Deserialize, Serialize};

use crate::policy;
use crate::proxy::{IdentitySettings, IpNet, UnderscoreHeaders, UpstreamSettings};
use crate::route::{self, Grant, MethodSet, Route, RouteTable, TenantFrom};
use crate::server::Settings;
use crate::store::redis::RedisSettings;
use crate::store::StoreSettings;
use crate::telemetry::LogSettings;
use crate::verify::CacheSettings;

/// Environment variable prefix; `KEYGATE__SERVER__LISTEN` sets `server.listen`.
pub const ENV_PREFIX: &str = "KEYGATE__";

/// A configuration problem, naming the field (or file, or variable) at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The config file could not be read.
    #[error("cannot read config file {}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// Why (printed as the cause, after this error's own message).
        #[source]
        source: std::io::Error,
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

    /// Names where the value came from, looked up in `origins` if not known yet.
    fn located(self, origins: &Origins) -> Self {
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

fn field_err(field: &str, message: impl Into<String>) -> ConfigError {
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
/// `routes[0].upstream`), the source that won; built by [`Config::load`]. A setting that is not
/// here has its default (or was set in code).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Origins(BTreeMap<String, Origin>);

impl Origins {
    /// Records where `path` came from (a later source replaces an earlier one).
    pub fn set(&mut self, path: impl Into<String>, origin: Origin) {
        self.0.insert(path.into(), origin);
    }

    /// Where the value of `field` came from: its own entry, else that of the setting it is part
    /// of (`routes[0].roles[1]` is part of `routes[0].roles`), else that of a setting within it
    /// (`roles.x` holds `roles.x.methods`).
    pub fn of(&self, field: &str) -> Option<&Origin> {
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

/// Collects every error of a validation instead of stopping at the first, each with where its
/// value came from.
struct Check<'a> {
    origins: &'a Origins,
    errors: Vec<ConfigError>,
}

impl<'a> Check<'a> {
    fn new(origins: &'a Origins) -> Self {
        Check {
            origins,
            errors: Vec::new(),
        }
    }

    /// The value, or `None` with its error kept (once: `upstream.url` and the roles are
    /// checked by two validations).
    fn ok<T>(&mut self, r: Result<T, ConfigError>) -> Option<T> {
        r.map_err(|e| {
            let e = e.located(self.origins);
            let text = e.to_string();
            if !self.errors.iter().any(|seen| seen.to_string() == text) {
                self.errors.push(e);
            }
        })
        .ok()
    }

    /// Every error seen; `build` runs only when there were none, so each value it takes is
    /// present.
    fn finish<T>(self, build: impl FnOnce() -> Option<T>) -> Result<T, ConfigError> {
        let mut errors = self.errors;
        match errors.len() {
            0 => build().ok_or_else(|| field_err("config", "incomplete validation")),
            1 => Err(errors.remove(0)),
            _ => Err(ConfigError::Many(errors)),
        }
    }
}

/// The whole configuration file, as written by the operator.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// Listeners and connection limits.
    pub server: ServerConfig,
    /// The default upstream.
    pub upstream: UpstreamConfig,
    /// Where key records live.
    pub store: StoreConfig,
    /// The verdict cache.
    pub cache: CacheConfig,
    /// Identity headers sent upstream.
    pub identity: IdentityConfig,
    /// Logging.
    pub log: LogConfig,
    /// `[roles.<name>]`: roles beyond (or replacing) the built-in `admin`, `member` and
    /// `readonly`.
    pub roles: BTreeMap<String, RoleConfig>,
    /// `[[routes]]`: the route table; `upstream.url`, when set, adds a catch-all route after
    /// these.
    pub routes: Vec<RouteConfig>,
    /// The management API.
    pub admin: AdminConfig,
    /// Where each setting came from (not a setting itself).
    #[serde(skip)]
    pub origins: Origins,
}

/// `[roles.<name>]`: what a role may do, as a list of methods or a named permission set.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleConfig {
    /// Methods the role may use, e.g. `["GET", "POST"]`; `"*"` for every method.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// A named permission set instead of `methods`: `all` or `read` (GET, HEAD, OPTIONS).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub permissions: Option<String>,
}

/// `[[routes]]`: one entry of the route table.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RouteConfig {
    /// A name for logs; `routes[i]` when unset.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub name: Option<String>,
    /// Match only this host (`Host` header, port ignored); unset matches every host.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub host: Option<String>,
    /// Match paths under this prefix, segment by segment (`/api` matches `/api/x`, not `/apix`).
    pub path_prefix: String,
    /// Match only these methods; unset matches every method.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub methods: Option<Vec<String>>,
    /// Where matched requests go; defaults to `upstream.url`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// Require a valid key (`false` for open paths such as a public health check).
    pub auth: bool,
    /// Roles admitted; unset admits every role. `["admin"]` makes an admin-only route.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub roles: Option<Vec<String>>,
    /// Bind the route to the key's tenant: a path template `/tenants/{tenant}` or
    /// `header:<name>`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tenant_from: Option<String>,
    /// Match `path_prefix` ignoring ASCII case (for upstreams that ignore case).
    pub ignore_case: bool,
}

impl Default for RouteConfig {
    fn default() -> Self {
        RouteConfig {
            name: None,
            host: None,
            path_prefix: "/".into(),
            methods: None,
            upstream: None,
            auth: true,
            roles: None,
            tenant_from: None,
            ignore_case: false,
        }
    }
}

/// `[admin]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct AdminConfig {
    /// Keys of this tenant with an admin role manage every tenant through the API; keys of
    /// any other tenant manage only their own tenant's records.
    pub operator_tenant: String,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            operator_tenant: "keygate".into(),
        }
    }
}

/// `[server]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ServerConfig {
    /// Proxy listener address.
    pub listen: String,
    /// Admin listener address (`/healthz`, `/readyz`).
    pub admin_listen: String,
    /// How long in-flight requests may run after SIGTERM/SIGINT.
    pub shutdown_grace: String,
    /// Time a client has to send a complete request head: the first from accept (protocol
    /// detection included), later ones on HTTP/1.1 from their first byte.
    pub header_read_timeout: String,
    /// A connection with no request in flight is closed after this long.
    pub idle_timeout: String,
    /// Most open client connections on the proxy listener (all workers together); 0: derived
    /// from the process's file descriptor limit.
    pub max_connections: usize,
    /// Most open connections on the admin listener, apart from the proxy's, so probes still
    /// answer when the proxy listener is full.
    pub admin_max_connections: usize,
    /// Largest request head (request line plus headers) accepted, in bytes.
    pub max_header_bytes: usize,
    /// Proxy worker threads, each with its own event loop and upstream connections; 0 for
    /// one per CPU.
    pub workers: usize,
    /// What to do with request headers whose names contain `_`: `drop`, `reject` or `allow`.
    pub headers_with_underscores: String,
    /// Peers (IP addresses or CIDR ranges) whose `X-Forwarded-*` headers are kept.
    pub trusted_proxies: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            shutdown_grace: "30s".into(),
            header_read_timeout: "10s".into(),
            idle_timeout: "75s".into(),
            max_connections: 0,
            admin_max_connections: 64,
            max_header_bytes: 16 * 1024,
            workers: 0,
            headers_with_underscores: "drop".into(),
            trusted_proxies: Vec::new(),
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `http://host:port[/base]` of the service keygate guards.
    pub url: Option<String>,
    /// Time to establish a TCP connection to the upstream.
    pub connect_timeout: String,
    /// Time the upstream has to send response headers.
    pub timeout: String,
    /// How long a pooled connection may sit idle and still be reused.
    pub pool_idle_timeout: String,
    /// Idle pooled connections kept per upstream and proxy worker; connections in use are not
    /// counted (0: a connection per request).
    pub pool_max_idle: usize,
    /// Send the client's `Host` upstream instead of the upstream's authority.
    pub preserve_host: bool,
    /// `/readyz` requires the upstream to accept a TCP connection.
    pub readiness_check: bool,
}

impl Default for UpstreamConfig {
    fn default() -> Self {
        UpstreamConfig {
            url: None,
            connect_timeout: "2s".into(),
            timeout: "30s".into(),
            pool_idle_timeout: "90s".into(),
            pool_max_idle: 256,
            preserve_host: false,
            readiness_check: true,
        }
    }
}

/// `[store]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// Redis URL (`redis://[:password@]host:port[/db]`).
    pub redis_url: String,
    /// Prefix of every Redis key keygate reads or writes.
    pub namespace: String,
    /// Bound on every store call; past it the call fails and the request gets `503`.
    pub timeout: String,
    /// How often the invalidation subscription is checked with a PING (and how long the
    /// answer may take before the link counts as lost).
    pub health_check_interval: String,
    /// Use the embedded file store at this path instead of Redis.
    pub keys_file: Option<String>,
    /// How often a key's last use is recorded (at most once per key per interval, batched).
    pub last_used_interval: String,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            redis_url: "redis://127.0.0.1:6379".into(),
            namespace: "keygate".into(),
            timeout: "1s".into(),
            health_check_interval: "1s".into(),
            keys_file: None,
            last_used_interval: "5s".into(),
        }
    }
}

/// `[cache]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CacheConfig {
    /// Most verdicts kept.
    pub capacity: u64,
    /// Longest a known key's verdict is kept (never past the key's expiry).
    pub ttl: String,
    /// How long an unknown key is remembered as unknown.
    pub negative_ttl: String,
    /// How long cached verdicts stay trusted after the invalidation subscription is lost.
    pub trust_while_unsubscribed: String,
}

impl Default for CacheConfig {
    fn default() -> Self {
        CacheConfig {
            capacity: 100_000,
            ttl: "60s".into(),
            negative_ttl: "5s".into(),
            trust_while_unsubscribed: "3s".into(),
        }
    }
}

/// `[identity]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct IdentityConfig {
    /// Prefix of the identity headers; client headers with it are dropped.
    pub header_prefix: String,
    /// Forward the client's `Authorization` header upstream.
    pub forward_authorization: bool,
}

impl Default for IdentityConfig {
    fn default() -> Self {
        IdentityConfig {
            header_prefix: "x-keygate-".into(),
            forward_authorization: false,
        }
    }
}

/// `[log]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LogConfig {
    /// `text` or `json`.
    pub format: String,
    /// A `RUST_LOG`-style filter; `RUST_LOG` itself wins when set.
    pub level: String,
    /// One access log line per request (target `keygate::access`).
    pub access: bool,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
            access: true,
        }
    }
}

/// One setting given on the command line, e.g. `("server", "listen", "127.0.0.1:0")`.
pub type Override = (&'static str, &'static str, String);

impl Config {
    /// Merges defaults, the file, the environment and flag overrides, in rising precedence.
    pub fn load(
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

    /// Every role a key may be given under this configuration: the routes' roles (built-in and
    /// `[roles.*]`) and the admin API's.
    pub fn known_roles(&self) -> Result<policy::Roles, ConfigError> {
        let roles = self.roles().map_err(|e| e.located(&self.origins))?;
        Ok(policy::Roles::new(roles.into_iter().map(|(name, _)| name)))
    }

    /// The configuration as one line of JSON with every secret (the Redis password) masked,
    /// for the startup log.
    pub fn redacted_json(&self) -> String {
        let mut c = self.clone();
        c.store.redis_url = redact_url(&c.store.redis_url);
        serde_json::to_string(&c).unwrap_or_default()
    }

    /// Validates everything the proxy needs and builds its runtime settings. Every invalid
    /// setting is reported, each with its field and where its value came from.
    pub fn serve_settings(&self) -> Result<Settings, ConfigError> {
        let s = &self.server;
        let mut c = Check::new(&self.origins);
        let routes = c.ok(self.route_table());
        let roles = c.ok(self.known_roles());
        let upstream = match &self.upstream.url {
            Some(url) => c
                .ok(upstream_settings(&self.upstream, url, "upstream.url"))
                .map(Some),
            None => Some(None),
        };
        let identity = c.ok(self.identity_settings());
        let listen = c.ok(addr("server.listen", &s.listen));
        let admin_listen = c.ok(addr("server.admin_listen", &s.admin_listen));
        let shutdown_grace = c.ok(duration("server.shutdown_grace", &s.shutdown_grace));
        let header_read_timeout = c.ok(nonzero(
            "server.header_read_timeout",
            &s.header_read_timeout,
        ));
        let idle_timeout = c.ok(nonzero("server.idle_timeout", &s.idle_timeout));
        let max_connections = c.ok(bounded(
            "server.max_connections",
            s.max_connections,
            0,
            1 << 24,
        ));
        let admin_max_connections = c.ok(bounded(
            "server.admin_max_connections",
            s.admin_max_connections,
            1,
            1 << 16,
        ));
        let headers_with_underscores = c.ok(UnderscoreHeaders::parse(&s.headers_with_underscores)
            .ok_or_else(|| {
                field_err(
                    "server.headers_with_underscores",
                    format!(
                        "{:?}: expected \"drop\", \"reject\" or \"allow\"",
                        s.headers_with_underscores
                    ),
                )
            }));
        let trusted_proxies = c.ok(s
            .trusted_proxies
            .iter()
            .enumerate()
            .map(|(i, net)| {
                IpNet::parse(net).ok_or_else(|| {
                    field_err(
                        &format!("server.trusted_proxies[{i}]"),
                        format!(
                            "{net:?} is not an IP address or CIDR range like 10.0.0.0/8 or fd00::/8"
                        ),
                    )
                })
            })
            .collect::<Result<Box<[IpNet]>, _>>());
        let max_header_bytes = c.ok(bounded(
            "server.max_header_bytes",
            s.max_header_bytes,
            1024,
            1 << 20,
        ));
        let workers = c
            .ok(bounded("server.workers", s.workers, 0, 1024))
            .map(|n| match n {
                0 => std::thread::available_parallelism().map_or(1, |n| n.get()),
                n => n,
            });
        let store = c.ok(self.store_settings());
        let capacity = c.ok(bounded(
            "cache.capacity",
            self.cache.capacity as usize,
            1,
            1 << 30,
        ));
        let ttl = c.ok(nonzero("cache.ttl", &self.cache.ttl));
        let negative_ttl = c.ok(nonzero("cache.negative_ttl", &self.cache.negative_ttl));
        let trust_while_unsubscribed = c.ok(duration(
            "cache.trust_while_unsubscribed",
            &self.cache.trust_while_unsubscribed,
        )
        .and_then(|trust| {
            // Cached verdicts are trusted only this long after the subscription last answered
            // a health check, so the checks must come more often or the cache would keep
            // lapsing.
            match &store {
                Some(StoreSettings::Redis(r)) if trust <= r.health_check_interval => {
                    Err(field_err(
                        "cache.trust_while_unsubscribed",
                        format!(
                            "{trust:?} must be longer than store.health_check_interval ({:?}): \
                             cached verdicts are trusted only this long after the last answered \
                             health check",
                            r.health_check_interval
                        ),
                    ))
                }
                _ => Ok(trust),
            }
        }));
        let log = c.ok(self.log_settings());
        let last_used_interval =
            c.ok(
                nonzero("store.last_used_interval", &self.store.last_used_interval).and_then(|d| {
                    if d < Duration::from_secs(1) {
                        return Err(field_err("store.last_used_interval", "must be at least 1s"));
                    }
                    Ok(d)
                }),
            );
        let operator_tenant = c.ok({
            let t = &self.admin.operator_tenant;
            crate::store::check_ident("admin.operator_tenant", t)
                .map(|()| t.clone())
                .map_err(|_| {
                    field_err(
                        "admin.operator_tenant",
                        "1 to 64 characters of letters, digits and -_.",
                    )
                })
        });
        c.finish(|| {
            Some(Settings {
                listen: listen?,
                admin_listen: admin_listen?,
                shutdown_grace: shutdown_grace?,
                header_read_timeout: header_read_timeout?,
                idle_timeout: idle_timeout?,
                max_connections: max_connections?,
                admin_max_connections: admin_max_connections?,
                max_header_bytes: max_header_bytes?,
                workers: workers?,
                headers_with_underscores: headers_with_underscores?,
                trusted_proxies: trusted_proxies?,
                upstream: upstream?,
                routes: routes?,
                roles: roles?,
                store: store?,
                cache: CacheSettings {
                    capacity: capacity? as u64,
                    ttl: ttl?,
                    negative_ttl: negative_ttl?,
                    trust_while_unsubscribed: trust_while_unsubscribed?,
                },
                identity: identity?,
                log: log?,
                last_used_interval: last_used_interval?,
                operator_tenant: operator_tenant?,
            })
        })
    }

    /// The roles: the built-in ones, then `[roles.*]` (which may redefine them).
    fn roles(&self) -> Result<Vec<(String, MethodSet)>, ConfigError> {
        let mut roles: Vec<(String, MethodSet)> = policy::DEFAULT_ROLES
            .iter()
            .map(|(name, methods)| ((*name).to_owned(), *methods))
            .collect();
        for (name, rc) in &self.roles {
            let f = format!("roles.{name}");
            if crate::store::check_ident("role", name).is_err() {
                return Err(field_err(
                    &f,
                    "role names are 1 to 64 characters of letters, digits and -_.",
                ));
            }
            let methods = match (&rc.methods, &rc.permissions) {
                (Some(list), None) => method_set(&format!("{f}.methods"), list)?,
                (None, Some(set)) => policy::permission_set(set).ok_or_else(|| {
                    field_err(
                        &format!("{f}.permissions"),
                        format!("{set:?}: expected \"all\" or \"read\""),
                    )
                })?,
                _ => return Err(field_err(&f, "set exactly one of methods or permissions")),
            };
            match roles.iter_mut().find(|(n, _)| n == name) {
                Some(role) => role.1 = methods,
                None => roles.push((name.clone(), methods)),
            }
        }
        Ok(roles)
    }

    /// Validates `[[routes]]` and `upstream.url` into the route table, most specific first.
    pub fn route_table(&self) -> Result<RouteTable<UpstreamSettings>, ConfigError> {
        let roles = self.roles()?;
        let all_roles = || -> Box<[Grant]> {
            roles
                .iter()
                .map(|(role, methods)| Grant {
                    role: role.as_str().into(),
                    methods: *methods,
                })
                .collect()
        };
        let default_url = self.upstream.url.as_deref();
        let mut routes = Vec::with_capacity(self.routes.len() + 1);
        for (i, rc) in self.routes.iter().enumerate() {
            let f = |field: &str| format!("routes[{i}].{field}");
            let host = match &rc.host {
                Some(h) => Some(route::parse_host(h).map_err(|m| field_err(&f("host"), m))?),
                None => None,
            };
            let prefix = route::parse_prefix(&rc.path_prefix)
                .map_err(|m| field_err(&f("path_prefix"), m))?;
            let methods = match &rc.methods {
                Some(list) => Some(method_set(&f("methods"), list)?),
                None => None,
            };
            let url = rc.upstream.as_deref().or(default_url).ok_or_else(|| {
                field_err(
                    &f("upstream"),
                    "required (or set upstream.url as the default of every route)",
                )
            })?;
            let upstream = upstream_settings(&self.upstream, url, &f("upstream"))?;
            let tenant = match &rc.tenant_from {
                Some(spec) => {
                    TenantFrom::parse(spec).map_err(|m| field_err(&f("tenant_from"), m))?
                }
                None => TenantFrom::Unbound,
            };
            if !tenant.fits(&prefix, rc.ignore_case) {
                return Err(field_err(
                    &f("tenant_from"),
                    format!(
                        "does not fit path_prefix {prefix:?}: no request on this route could name a tenant"
                    ),
                ));
            }
            if !rc.auth && (rc.roles.is_some() || tenant != TenantFrom::Unbound) {
                return Err(field_err(
                    &f("auth"),
                    "an open route (auth = false) admits everyone: it cannot have roles or tenant_from",
                ));
            }
            let grants = match &rc.roles {
                None => all_roles(),
                Some(names) if names.is_empty() => {
                    return Err(field_err(&f("roles"), "must name at least one role"))
                }
                Some(names) => names
                    .iter()
                    .enumerate()
                    .map(|(j, name)| {
                        let (role, methods) =
                            roles.iter().find(|(r, _)| r == name).ok_or_else(|| {
                                let known: Vec<&str> =
                                    roles.iter().map(|(r, _)| r.as_str()).collect();
                                field_err(
                                    &format!("routes[{i}].roles[{j}]"),
                                    format!(
                                        "unknown role {name:?}; known roles: {}",
                                        known.join(", ")
                                    ),
                                )
                            })?;
                        Ok(Grant {
                            role: role.as_str().into(),
                            methods: *methods,
                        })
                    })
                    .collect::<Result<_, ConfigError>>()?,
            };
            let route = Route {
                name: rc
                    .name
                    .clone()
                    .unwrap_or_else(|| format!("routes[{i}]"))
                    .into(),
                host,
                prefix,
                ignore_case: rc.ignore_case,
                methods,
                auth: rc.auth,
                grants,
                tenant,
                upstream,
            };
            if let Some(j) = routes.iter().position(|r| overlaps(r, &route)) {
                return Err(field_err(
                    &format!("routes[{i}]"),
                    format!(
                        "overlaps routes[{j}] (same host, path_prefix and methods): one of them could never match"
                    ),
                ));
            }
            routes.push(route);
        }
        // The sidecar case: `--upstream` alone is one catch-all route. Explicit routes for all
        // hosts and `/` come first in config order, so they take precedence over it.
        if let Some(url) = default_url {
            routes.push(Route {
                name: "default".into(),
                host: None,
                prefix: "/".into(),
                ignore_case: false,
                methods: None,
                auth: true,
                grants: all_roles(),
                tenant: TenantFrom::Unbound,
                upstream: upstream_settings(&self.upstream, url, "upstream.url")?,
            });
        }
        if routes.is_empty() {
            return Err(field_err(
                "upstream.url",
                "required: give --upstream URL or set it in the config (or define [[routes]])",
            ));
        }
        Ok(RouteTable::new(routes))
    }

    /// Validates the store settings alone (all the key-management commands need).
    pub fn store_settings(&self) -> Result<StoreSettings, ConfigError> {
        let st = &self.store;
        if let Some(file) = &st.keys_file {
            if file.is_empty() {
                return Err(field_err("store.keys_file", "must not be empty"));
            }
            return Ok(StoreSettings::File(PathBuf::from(file)));
        }
        let url = &st.redis_url;
        if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
            return Err(field_err(
                "store.redis_url",
                format!("{url:?} is not a redis:// or rediss:// URL"),
            ));
        }
        if redis::Client::open(url.as_str()).is_err() {
            return Err(field_err("store.redis_url", "not a valid Redis URL"));
        }
        let ns = &st.namespace;
        if ns.is_empty()
            || ns.len() > 64
            || !ns
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.:{}".contains(&b))
        {
            return Err(field_err(
                "store.namespace",
                "1 to 64 characters of letters, digits and -_.:{}",
            ));
        }
        Ok(StoreSettings::Redis(RedisSettings {
            url: url.clone(),
            namespace: ns.clone(),
            timeout: nonzero("store.timeout", &st.timeout)?,
            health_check_interval: nonzero(
                "store.health_check_interval",
                &st.health_check_interval,
            )?,
        }))
    }

    /// Validates `[identity]` into the identity header names.
    pub fn identity_settings(&self) -> Result<IdentitySettings, ConfigError> {
        let c = &self.identity;
        IdentitySettings::new(&c.header_prefix, c.forward_authorization)
            .map_err(|m| field_err("identity.header_prefix", m).located(&self.origins))
    }

    /// Validates the logging settings.
    pub fn log_settings(&self) -> Result<LogSettings, ConfigError> {
        let json = match self.log.format.as_str() {
            "text" => false,
            "json" => true,
            other => {
                return Err(field_err(
                    "log.format",
                    format!("{other:?}: expected \"text\" or \"json\""),
                ))
            }
        };
        Ok(LogSettings {
            json,
            filter: self.log.level.clone(),
            access: self.log.access,
        })
    }
}

/// Masks the password of a `scheme://user:password@host…` URL.
fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find('/').unwrap_or(rest.len());
    match rest[..authority_end].rfind('@') {
        Some(at) => {
            let user = rest[..at].split(':').next().unwrap_or("");
            format!("{scheme}://{user}:[redacted]{}", &rest[at..])
        }
        None => url.to_owned(),
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

/// Two routes overlap when some request could match both equally well: then only config
/// order would decide, which is a trap, so it is refused.
fn overlaps<U>(a: &Route<U>, b: &Route<U>) -> bool {
    let same_prefix = if a.ignore_case || b.ignore_case {
        a.prefix.eq_ignore_ascii_case(&b.prefix)
    } else {
        a.prefix == b.prefix
    };
    let methods = |r: &Route<U>| r.methods.unwrap_or(MethodSet::ALL);
    a.host == b.host
        && same_prefix
        && a.methods.is_some() == b.methods.is_some()
        && methods(a).intersects(methods(b))
}

/// Parses a configured list of methods.
fn method_set(field: &str, list: &[String]) -> Result<MethodSet, ConfigError> {
    if list.is_empty() {
        return Err(field_err(field, "must name at least one method"));
    }
    list.iter().enumerate().try_fold(MethodSet::NONE, |set, (j, m)| {
        MethodSet::parse(m).map(|one| set.union(one)).ok_or_else(|| {
            field_err(
                &format!("{field}[{j}]"),
                format!("{m:?} is not a method: expected GET, HEAD, OPTIONS, POST, PUT, PATCH, DELETE, TRACE, CONNECT or \"*\""),
            )
        })
    })
}

fn addr(field: &str, v: &str) -> Result<SocketAddr, ConfigError> {
    v.parse().map_err(|_| {
        field_err(
            field,
            format!("{v:?} is not an address like 127.0.0.1:8080"),
        )
    })
}

fn duration(field: &str, v: &str) -> Result<Duration, ConfigError> {
    humantime::parse_duration(v).map_err(|e| {
        field_err(
            field,
            format!("{v:?} is not a duration like 500ms or 30s: {e}"),
        )
    })
}

fn nonzero(field: &str, v: &str) -> Result<Duration, ConfigError> {
    let d = duration(field, v)?;
    if d.is_zero() {
        return Err(field_err(field, "must be greater than zero"));
    }
    Ok(d)
}

fn bounded(field: &str, v: usize, min: usize, max: usize) -> Result<usize, ConfigError> {
    if v < min || v > max {
        return Err(field_err(field, format!("{v} is outside {min}..={max}")));
    }
    Ok(v)
}

/// Validates one upstream URL with the `[upstream]` settings.
fn upstream_settings(
    c: &UpstreamConfig,
    url: &str,
    f: &str,
) -> Result<UpstreamSettings, ConfigError> {
    let uri: Uri = url
        .parse()
        .map_err(|e| field_err(f, format!("{url:?} is not a URL: {e}")))?;
    let scheme = uri
        .scheme()
        .cloned()
        .ok_or_else(|| field_err(f, "needs a scheme, e.g. http://127.0.0.1:3000"))?;
    if scheme != http::uri::Scheme::HTTP {
        return Err(field_err(f, "only http:// upstreams are supported"));
    }
    let authority = uri
        .authority()
        .cloned()
        .ok_or_else(|| field_err(f, "needs a host, e.g. http://127.0.0.1:3000"))?;
    if uri.query().is_some() {
        return Err(field_err(f, "must not have a query"));
    }
    let base_path = uri.path().trim_end_matches('/').to_owned();
    let host_header = HeaderValue::from_str(authority.as_str())
        .map_err(|_| field_err(f, "host is not a valid header value"))?;
    Ok(UpstreamSettings {
        scheme,
        authority,
        host_header,
        base_path,
        connect_timeout: nonzero("upstream.connect_timeout", &c.connect_timeout)?,
        timeout: nonzero("upstream.timeout", &c.timeout)?,
        pool_idle_timeout: nonzero("upstream.pool_idle_timeout", &c.pool_idle_timeout)?,
        pool_max_idle: c.pool_max_idle,
        preserve_host: c.preserve_host,
        readiness_check: c.readiness_check,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn workers_default_to_one_per_cpu_and_are_bounded() {
        let mut c = Config::default();
        c.upstream.url = Some("http://127.0.0.1:3000".into());
        let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
        assert_eq!(c.serve_settings().unwrap().workers, cpus);
        c.server.workers = 3;
        assert_eq!(c.serve_settings().unwrap().workers, 3);
        c.server.workers = 5000;
        let err = c.serve_settings().unwrap_err().to_string();
        assert!(err.starts_with("server.workers"), "{err}");
    }

    #[test]
    fn header_policies_are_validated_with_their_field() {
        let mut c = Config::default();
        c.upstream.url = Some("http://127.0.0.1:3000".into());
        let s = c.serve_settings().unwrap();
        assert_eq!(s.headers_with_underscores, UnderscoreHeaders::Drop);
        c.server.headers_with_underscores = "reject".into();
        let s = c.serve_settings().unwrap();
        assert_eq!(s.headers_with_underscores, UnderscoreHeaders::Reject);
        c.server.headers_with_underscores = "ignore".into();
        let err = c.serve_settings().unwrap_err().to_string();
        assert!(err.starts_with("server.headers_with_underscores"), "{err}");
        c.server.headers_with_underscores = "allow".into();
        c.identity.header_prefix = "x_auth_".into();
        let err = c.serve_settings().unwrap_err().to_string();
        assert!(err.starts_with("identity.header_prefix"), "{err}");
    }

    #[test]
    fn trusted_proxies_are_ip_networks() {
        let net = |v: &str| IpNet::parse(v).unwrap_or_else(|| panic!("{v}"));
        let ip = |v: &str| v.parse::<std::net::IpAddr>().unwrap();
        assert!(net("10.0.0.0/8").contains(ip("10.255.1.2")));
        assert!(!net("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(net("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")));
        assert!(net("192.0.2.7").contains(ip("192.0.2.7")));
        assert!(!net("192.0.2.7").contains(ip("192.0.2.8")));
        assert!(net("0.0.0.0/0").contains(ip("203.0.113.1")));
        assert!(!net("0.0.0.0/0").contains(ip("2001:db8::1")));
        assert!(net("fd00::/8").contains(ip("fd12::1")));
        assert!(!net("fd00::/8").contains(ip("fe80::1")));
        assert!(net("::/0").contains(ip("2001:db8::1")));
        assert!(net("2001:db8::1").contains(ip("2001:db8::1")));
        assert!(net("172.16.0.0/12").contains(ip("172.31.255.255")));
        assert!(!net("172.16.0.0/12").contains(ip("172.32.0.0")));
        for bad in [
            "",
            "10.0.0.0/33",
            "10.1.0.0/8",
            "10.0.0.0/",
            "10.0.0.0/+8",
            "host",
            "fd00::/129",
        ] {
            assert!(IpNet::parse(bad).is_none(), "{bad}");
        }
        let mut c = Config::default();
        c.upstream.url = Some("http://127.0.0.1:3000".into());
        c.server.trusted_proxies = vec!["10.0.0.0/8".into(), "10.1.0.0/8".into()];
        let err = c.serve_settings().unwrap_err().to_string();
        assert!(err.starts_with("server.trusted_proxies[1]"), "{err}");

        // From the environment: a comma-separated list.
        let env = env(&[("KEYGATE__SERVER__TRUSTED_PROXIES", "10.0.0.0/8, fd00::/8")]);
        let c = Config::load(None, env, &[]).unwrap();
        assert_eq!(c.server.trusted_proxies, ["10.0.0.0/8", "fd00::/8"]);
    }

    #[test]
    fn the_startup_dump_masks_the_redis_password() {
        let mut c = Config::default();
        c.store.redis_url = "redis://app:s3cret@redis.internal:6379/2".into();
        let dump = c.redacted_json();
        assert!(!dump.contains("s3cret"), "{dump}");
        assert!(
            dump.contains("redis://app:[redacted]@redis.internal:6379/2"),
            "{dump}"
        );
        assert_eq!(redact_url("redis://:pw@h:1"), "redis://:[redacted]@h:1");
        assert_eq!(redact_url("redis://h:1/0"), "redis://h:1/0");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn flags_beat_env_beat_file() {
        let dir = std::env::temp_dir().join(format!("keygate-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("k.toml");
        std::fs::write(
            &file,
            "[server]\nlisten = \"127.0.0.1:1\"\nadmin_listen = \"127.0.0.1:2\"\n[store]\nnamespace = \"file\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("KEYGATE__SERVER__LISTEN", "127.0.0.1:3"),
                ("KEYGATE__STORE__NAMESPACE", "123"),
                ("KEYGATE__CACHE__CAPACITY", "77"),
                ("OTHER", "x"),
            ]),
            &[("server", "listen", "127.0.0.1:4".into())],
        )
        .unwrap();
        assert_eq!(c.server.listen, "127.0.0.1:4");
        assert_eq!(c.server.admin_listen, "127.0.0.1:2");
        assert_eq!(c.store.namespace, "123");
        assert_eq!(c.cache.capacity, 77);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn origins_are_found_for_a_setting_its_parts_and_its_table() {
        let mut o = Origins::default();
        let file = || Origin::File("k.toml".into());
        o.set("routes[0].roles", file());
        o.set("roles.x-y.methods", Origin::Env("E".into()));
        o.set("roles.x.methods", file());
        o.set("server.listen", Origin::Flag("--listen".into()));
        assert_eq!(o.of("routes[0].roles[1]"), Some(&file()));
        assert_eq!(o.of("roles.x"), Some(&file()), "the table of a setting");
        assert_eq!(
            o.of("server.listen"),
            Some(&Origin::Flag("--listen".into()))
        );
        assert_eq!(o.of("server.admin_listen"), None, "a default has no origin");
        assert_eq!(o.of("routes[1].upstream"), None);
    }

    #[test]
    fn unknown_field_is_named() {
        let err = Config::load(None, env(&[("KEYGATE__SERVER__LISTN", "x")]), &[]).unwrap_err();
        assert!(err.to_string().contains("listn"), "{err}");
        let err = Config::load(None, env(&[("KEYGATE__NOPE__X", "x")]), &[]).unwrap_err();
        assert!(err.to_string().contains("KEYGATE__NOPE__X"), "{err}");
    }

    #[test]
    fn bad_values_name_their_field() {
        let err = Config::load(None, env(&[("KEYGATE__CACHE__CAPACITY", "lots")]), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("KEYGATE__CACHE__CAPACITY"), "{err}");

        let mut c = Config::default();
        assert!(c
            .serve_settings()
            .unwrap_err()
            .to_string()
            .starts_with("upstream.url"));
        c.upstream.url = Some("http://127.0.0.1:3000".into());
        c.cache.negative_ttl = "soon".into();
        let err = c.serve_settings().unwrap_err().to_string();
        assert!(err.starts_with("cache.negative_ttl"), "{err}");
        c.cache.negative_ttl = "1s".into();
        c.store.redis_url = "http://x".into();
        let err = c.serve_settings().unwrap_err().to_string();
        assert!(err.starts_with("store.redis_url"), "{err}");
        c.store.redis_url = "redis://127.0.0.1:1".into();
        c.upstream.url = Some("ftp://x".into());
        let err = c.serve_settings().unwrap_err().to_string();
        assert!(err.starts_with("upstream.url"), "{err}");
    }

    #[test]
    fn file_syntax_errors_name_the_file_and_line() {
        let dir = std::env::temp_dir().join(format!("keygate-cfg2-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("bad.toml");
        std::fs::write(&file, "[server]\nlisten = \n").unwrap();
        let err = Config::load(Some(&file), Vec::new(), &[])
            .unwrap_err()
            .to_string();
        assert!(err.contains("bad.toml") && err.contains("line 2"), "{err}");
        std::fs::write(&file, "[server]\nlisten = 5\n").unwrap();
        let err = Config::load(Some(&file), Vec::new(), &[])
            .unwrap_err()
            .to_string();
        assert!(err.starts_with("server.listen"), "{err}");
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn upstream_base_path_is_kept_without_trailing_slash() {
        let c = Config {
            upstream: UpstreamConfig {
                url: Some("http://127.0.0.1:3000/api/".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let up = c.serve_settings().unwrap().upstream.unwrap();
        assert_eq!(up.base_path, "/api");
        assert_eq!(up.authority.as_str(), "127.0.0.1:3000");
    }

    fn routes_config(toml_text: &str) -> Result<Settings, ConfigError> {
        let dir = std::env::temp_dir().join(format!(
            "keygate-cfg-routes-{}-{}",
            std::process::id(),
            rand::random::<u32>()
        ));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("routes.toml");
        std::fs::write(&file, toml_text).unwrap();
        let loaded = Config::load(Some(&file), Vec::new(), &[]);
        std::fs::remove_dir_all(dir).unwrap();
        loaded?.serve_settings()
    }

    #[test]
    fn routes_and_roles_are_read_from_the_file() {
        let s = routes_config(
            r#"
            [roles.auditor]
            methods = ["GET", "HEAD"]
            [roles.readonly]
            permissions = "all"

            [[routes]]
            path_prefix = "/healthz"
            upstream = "http://127.0.0.1:3001"
            auth = false

            [[routes]]
            name = "admin"
            host = "API.example.com"
            path_prefix = "/admin/"
            upstream = "http://127.0.0.1:3002/base"
            roles = ["admin", "auditor"]
            tenant_from = "header:x-tenant"
            "#,
        )
        .unwrap();
        assert!(s.upstream.is_none());
        let routes: Vec<_> = s.routes.iter().collect();
        assert_eq!(routes.len(), 2);
        // Host-specific first.
        assert_eq!(&*routes[0].name, "admin");
        assert_eq!(routes[0].host.as_deref(), Some("api.example.com"));
        assert_eq!(&*routes[0].prefix, "/admin");
        assert_eq!(routes[0].upstream.base_path, "/base");
        let roles: Vec<_> = routes[0].grants.iter().map(|g| &*g.role).collect();
        assert_eq!(roles, ["admin", "auditor"]);
        assert!(routes[0].binds_tenant());
        assert!(!routes[1].auth);
        // Every role, with `readonly` redefined by the file.
        let readonly = routes[1].grants.iter().find(|g| &*g.role == "readonly");
        assert_eq!(readonly.unwrap().methods, MethodSet::ALL);
    }

    #[test]
    fn the_upstream_url_is_the_last_catch_all_route() {
        let mut c = Config::default();
        c.upstream.url = Some("http://127.0.0.1:3000".into());
        c.routes.push(RouteConfig {
            path_prefix: "/public".into(),
            auth: false,
            ..Default::default()
        });
        let s = c.serve_settings().unwrap();
        let names: Vec<_> = s.routes.iter().map(|r| &*r.name).collect();
        assert_eq!(names, ["routes[0]", "default"]);
        // The route without its own upstream uses upstream.url.
        assert_eq!(
            s.routes.iter().next().unwrap().upstream.authority,
            "127.0.0.1:3000"
        );
    }

    #[test]
    fn route_and_role_errors_name_their_field() {
        let cases = [
            ("[[routes]]\npath_prefix = \"/a\"", "routes[0].upstream"),
            (
                "[[routes]]\nupstream = \"http://x\"\n[[routes]]\nupstream = \"ftp://x\"",
                "routes[1].upstream",
            ),
            (
                "[[routes]]\nupstream = \"http://x\"\ntenant_from = \"/t/{tenant\"",
                "routes[0].tenant_from",
            ),
            (
                "[[routes]]\nupstream = \"http://x\"\npath_prefix = \"/api\"\ntenant_from = \"/t/{tenant}\"",
                "routes[0].tenant_from",
            ),
            (
                "[[routes]]\nupstream = \"http://x\"\nroles = [\"admin\", \"boss\"]",
                "routes[0].roles[1]",
            ),
            (
                "[[routes]]\nupstream = \"http://x\"\nmethods = [\"GET\", \"get\"]",
                "routes[0].methods[1]",
            ),
            (
                "[[routes]]\nupstream = \"http://x\"\npath_prefix = \"/a/../b\"",
                "routes[0].path_prefix",
            ),
            (
                "[[routes]]\nupstream = \"http://x\"\nhost = \"a:80\"",
                "routes[0].host",
            ),
            (
                "[[routes]]\nupstream = \"http://x\"\nauth = false\nroles = [\"admin\"]",
                "routes[0].auth",
            ),
            (
                "[[routes]]\nupstream = \"http://x\"\npath_prefix = \"/a\"\n[[routes]]\nupstream = \"http://y\"\npath_prefix = \"/a/\"",
                "routes[1]",
            ),
            ("[[routes]]\nupstream = \"http://x\"\nprefix = \"/a\"", "routes[0]"),
            ("[roles.x]\nmethods = [\"GET\"]\npermissions = \"read\"", "roles.x"),
            ("[roles.x]\npermissions = \"write\"", "roles.x.permissions"),
            ("[roles.\"a b\"]\npermissions = \"read\"", "roles.a b"),
        ];
        for (text, field) in cases {
            let err = routes_config(text).unwrap_err().to_string();
            assert!(err.starts_with(field), "{text}\n=> {err}");
        }
        let err = Config::load(None, env(&[("KEYGATE__ROUTES__X", "1")]), &[]).unwrap_err();
        assert!(err.to_string().contains("config file"), "{err}");
    }

    #[test]
    fn routes_that_differ_in_methods_or_host_do_not_overlap() {
        routes_config(
            r#"
            [[routes]]
            upstream = "http://x"
            path_prefix = "/a"
            [[routes]]
            upstream = "http://x"
            path_prefix = "/a"
            methods = ["POST"]
            [[routes]]
            upstream = "http://x"
            path_prefix = "/a"
            methods = ["GET"]
            [[routes]]
            upstream = "http://x"
            host = "b.example"
            path_prefix = "/a"
            "#,
        )
        .unwrap();
        let err = routes_config(
            "[[routes]]\nupstream = \"http://x\"\nmethods = [\"GET\", \"PUT\"]\n[[routes]]\nupstream = \"http://x\"\nmethods = [\"PUT\"]",
        )
        .unwrap_err();
        let err = err.to_string();
        assert!(err.starts_with("routes[1] (config file "), "{err}");
        assert!(err.contains("): overlaps routes[0]"), "{err}");
    }

    /// The example config, with its commented routes and roles switched on when `uncomment`.
    fn example_config(uncomment: bool) -> String {
        let text = include_str!("../../config/keygate.toml");
        let Some(at) = text.find("# Roles and routes") else {
            panic!("config/keygate.toml documents routes");
        };
        let (head, tail) = text.split_at(at);
        if !uncomment {
            return text.to_owned();
        }
        let setting = |l: &str| {
            l.starts_with('[')
                || l.split_once(" = ")
                    .is_some_and(|(k, _)| k.bytes().all(|b| b.is_ascii_lowercase() || b == b'_'))
        };
        let tail: Vec<&str> = tail
            .lines()
            .map(|l| match l.strip_prefix("# ") {
                Some(rest) if setting(rest) => rest,
                _ => l,
            })
            .collect();
        format!("{head}{}\n", tail.join("\n"))
    }

    #[test]
    fn the_example_config_is_valid_with_and_without_its_routes() {
        let plain = routes_config(&example_config(false)).unwrap();
        assert_eq!(plain.routes.iter().count(), 1, "only the catch-all");
        let routed = routes_config(&example_config(true)).unwrap();
        let names: Vec<_> = routed.routes.iter().map(|r| r.name.to_string()).collect();
        assert_eq!(names.len(), 5, "{names:?}");
        assert!(names.contains(&"admin".to_owned()));
    }

    #[test]
    fn the_readme_routes_example_is_valid() {
        let readme = include_str!("../../README.md");
        let section = &readme[readme.find("## Routes and roles").unwrap()..];
        let block = section.split("```toml\n").nth(1).unwrap();
        let block = &block[..block.find("```").unwrap()];
        let text = format!("[upstream]\nurl = \"http://127.0.0.1:3000\"\n{block}");
        let s = routes_config(&text).unwrap();
        assert_eq!(s.routes.iter().count(), 5);
    }
}
