//! Configuration: the file format, read once, validated once, turned into the runtime's own
//! types.
//!
//! - This file: the format itself, [`Config`] and its sections with their defaults.
//! - `load`: `Config::load` merges the sources, lowest precedence first: built-in defaults, a
//!   TOML file (`--config`), environment variables `KEYGATE__<SECTION>__<FIELD>`, and
//!   command-line flags. They are merged as TOML values and deserialised with
//!   `deny_unknown_fields`; each setting's [`Origin`] is recorded as they merge. A misspelt
//!   field or a value of the wrong type does not stop loading: it is left out and kept in
//!   [`Config::load_errors`].
//! - `compile`: [`Config::serve_settings`] (and the smaller steps the management commands
//!   use) checks every value and builds the owners' settings types ([`Settings`] and what it
//!   holds): parsed addresses, durations, URIs and header names, so nothing on the request path
//!   parses config. Every step reports the errors found while loading first, then its own.
//! - `error`: [`ConfigError`], [`Origin`], [`Origins`], and the collector that reports every
//!   mistake at once, not only the first.
//!
//! Every error names its field and, when the operator set it, where the value came from (the
//! file, the environment variable, or the flag).
//!
//! [`Settings`]: crate::server::Settings

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

mod compile;
mod error;
mod load;
#[cfg(test)]
mod tests;

pub use error::{ConfigError, Origin, Origins};

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
    /// Rate limits (the limits themselves are set on roles and routes).
    pub limits: LimitsConfig,
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
    /// What was wrong while loading (an unknown field, a value of the wrong type, a variable
    /// that names no setting), each entry at fault left out; every compile step reports these
    /// first, so none succeeds while there are any (not a setting itself).
    #[serde(skip)]
    pub load_errors: Vec<ConfigError>,
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
    /// How fast each key of this role may call (`100/s`, `6000/min`, `tenant:1000/s` to share
    /// it among the tenant's keys); unset: no limit.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
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
    /// This route's `upstream.protocol` (`http1` or `h2`); defaults to `upstream.protocol`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_protocol: Option<String>,
    /// This route's `upstream.tls_ca`; defaults to `upstream.tls_ca`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_tls_ca: Option<String>,
    /// This route's `upstream.tls_client_cert`; defaults to `upstream.tls_client_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_tls_client_cert: Option<String>,
    /// This route's `upstream.tls_client_key`; defaults to `upstream.tls_client_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub upstream_tls_client_key: Option<String>,
    /// How fast each key (`100/s`) or each tenant (`tenant:100/s`) may call this route, on top
    /// of its role's limit; unset: no route limit.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub rate_limit: Option<String>,
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
            upstream_protocol: None,
            upstream_tls_ca: None,
            upstream_tls_client_cert: None,
            upstream_tls_client_key: None,
            rate_limit: None,
        }
    }
}

/// `[limits]`: how rate limits are enforced and reported.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct LimitsConfig {
    /// Send `RateLimit-Policy` and `RateLimit` on every response of a limited key, not only on
    /// its `429`s.
    pub headers_when_admitted: bool,
    /// Most rate limit buckets kept in memory (one per limited key, or tenant, and limit);
    /// beyond it the least recently used is dropped and starts full again.
    pub max_buckets: u64,
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            headers_when_admitted: true,
            max_buckets: 1_000_000,
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
    /// The decision endpoint's address, for gateways that ask keygate whether a request may
    /// pass (nginx `auth_request`, Traefik and Caddy forward auth, Envoy `ext_authz`); unset:
    /// off.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub authz_listen: Option<String>,
    /// How the decision endpoint's caller names the request it asks about: `request` (the
    /// check request is the original: Envoy's HTTP `ext_authz`), `grpc` (Envoy's gRPC
    /// `ext_authz` and Istio's `envoyExtAuthzGrpc`: the endpoint answers
    /// `envoy.service.auth.v3.Authorization/Check` only), `nginx` (`X-Original-Method`,
    /// `X-Original-URI`) or `forward_auth` (Traefik, Caddy: `X-Forwarded-Method`, `-Uri`,
    /// `-Host`).
    pub authz_caller: String,
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
    /// Requests served on one client connection before keygate closes it gracefully
    /// (HTTP/1.1: `Connection: close` on the last response; HTTP/2: a GOAWAY); 0: no limit.
    pub max_requests_per_connection: u32,
    /// HTTP/2: most streams a client may have open at once on one connection.
    pub http2_max_concurrent_streams: u32,
    /// HTTP/2: how often an idle connection is checked with a PING; `0s`: never.
    pub http2_keep_alive_interval: String,
    /// HTTP/2: a keep-alive PING unanswered this long closes the connection.
    pub http2_keep_alive_timeout: String,
    /// HTTP/2: most streams a client may open and reset before keygate has accepted them
    /// (rapid reset); past it the connection is closed with a GOAWAY.
    pub http2_max_pending_accept_reset_streams: usize,
    /// HTTP/2: most streams keygate may reset because the client broke the protocol on them;
    /// past it the connection is closed with a GOAWAY.
    pub http2_max_local_error_reset_streams: usize,
    /// PEM certificate chain of the proxy listener: set with `tls_key`, the listener speaks
    /// TLS only (the default certificate, for clients without SNI or with an unknown name).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    /// PEM private key of `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    /// `[[server.tls_certificates]]`: more certificates of the proxy listener, chosen by SNI
    /// (the first is the default when `tls_cert` is unset).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub tls_certificates: Vec<TlsCertificateConfig>,
    /// PEM CA bundle the proxy listener verifies client certificates against (mTLS).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_client_ca: Option<String>,
    /// With `tls_client_ca`: `required` (no handshake without a verified client certificate)
    /// or `optional` (a client may send none; routes may still require one).
    pub tls_client_auth: String,
    /// PEM certificate chain of the admin listener (off by default; may be `tls_cert`'s file).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_tls_cert: Option<String>,
    /// PEM private key of `admin_tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_tls_key: Option<String>,
    /// PEM CA bundle the admin listener verifies client certificates against.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_tls_client_ca: Option<String>,
    /// With `admin_tls_client_ca`: `required` or `optional`.
    pub admin_tls_client_auth: String,
}

/// `[[server.tls_certificates]]`: one certificate of the proxy listener chosen by SNI.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TlsCertificateConfig {
    /// PEM certificate chain, leaf first.
    pub cert: String,
    /// PEM private key.
    pub key: String,
    /// Host names it is chosen for (`api.example.com`, `*.example.com`); unset: the DNS names
    /// the certificate lists.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hosts: Vec<String>,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "127.0.0.1:9090".into(),
            authz_listen: None,
            authz_caller: "request".into(),
            shutdown_grace: "30s".into(),
            header_read_timeout: "10s".into(),
            idle_timeout: "75s".into(),
            max_connections: 0,
            admin_max_connections: 64,
            max_header_bytes: 16 * 1024,
            workers: 0,
            headers_with_underscores: "drop".into(),
            trusted_proxies: Vec::new(),
            max_requests_per_connection: 1000,
            http2_max_concurrent_streams: 256,
            http2_keep_alive_interval: "30s".into(),
            http2_keep_alive_timeout: "20s".into(),
            http2_max_pending_accept_reset_streams: 20,
            http2_max_local_error_reset_streams: 1024,
            tls_cert: None,
            tls_key: None,
            tls_certificates: Vec::new(),
            tls_client_ca: None,
            tls_client_auth: "required".into(),
            admin_tls_cert: None,
            admin_tls_key: None,
            admin_tls_client_ca: None,
            admin_tls_client_auth: "required".into(),
        }
    }
}

/// `[upstream]`
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct UpstreamConfig {
    /// `http://host:port[/base]` or `https://host:port[/base]` of the service keygate guards.
    pub url: Option<String>,
    /// How keygate speaks to the upstream: `http1` (HTTP/1.1, a pool of connections) or `h2`
    /// (HTTP/2, many requests multiplexed on each connection: by ALPN over `https://`, with
    /// prior knowledge (h2c) over `http://`).
    pub protocol: String,
    /// Most requests in flight on one HTTP/2 upstream connection before keygate opens another
    /// (keep it at or below the upstream's own stream limit).
    pub h2_max_streams: usize,
    /// CA bundle (PEM) that `https://` upstream certificates are verified against; unset: the
    /// system's trust store.
    pub tls_ca: Option<String>,
    /// Client certificate chain (PEM) keygate presents to `https://` upstreams that ask for
    /// one; needs `tls_client_key`.
    pub tls_client_cert: Option<String>,
    /// Private key (PEM) of `tls_client_cert`.
    pub tls_client_key: Option<String>,
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
            protocol: "http1".into(),
            h2_max_streams: 100,
            tls_ca: None,
            tls_client_cert: None,
            tls_client_key: None,
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
    /// Redis URL (`redis://[[user]:password@]host:port[/db]`; `rediss://` for TLS).
    pub redis_url: String,
    /// With `rediss://`: CA bundle (PEM) Redis's certificate must chain to; unset: the
    /// system roots.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca: Option<String>,
    /// With `rediss://`: client certificate chain (PEM) presented to Redis; needs `tls_key`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert: Option<String>,
    /// With `rediss://`: the client certificate's private key (PEM); needs `tls_cert`.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key: Option<String>,
    /// Redis Sentinel mode: the sentinels (`host:port` each) that name the master; empty:
    /// `redis_url` names the one server. With sentinels, `redis_url`'s scheme, user, password
    /// and database apply to the master, its host and port are not used.
    pub sentinels: Vec<String>,
    /// The name the sentinels monitor the master under (required with `sentinels`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel_master: Option<String>,
    /// ACL user on the sentinels (unset: the default user).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel_username: Option<String>,
    /// Password on the sentinels (`requirepass` or the ACL user's); never logged.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub sentinel_password: Option<String>,
    /// TLS to the sentinels too, with `tls_ca`, `tls_cert` and `tls_key` (needs `rediss://`).
    pub sentinel_tls: bool,
    /// Redis Cluster mode: some of the cluster's nodes (`host:port` each), from which keygate
    /// learns the rest; empty: not a cluster. `redis_url`'s scheme, user and password apply to
    /// every node, its host and port are not used.
    pub cluster_nodes: Vec<String>,
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
            tls_ca: None,
            tls_cert: None,
            tls_key: None,
            sentinels: Vec::new(),
            sentinel_master: None,
            sentinel_username: None,
            sentinel_password: None,
            sentinel_tls: false,
            cluster_nodes: Vec::new(),
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
    /// Access log lines queued for the writer thread; more are dropped (and counted) rather
    /// than making a request wait for stderr.
    pub access_buffer: usize,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            format: "text".into(),
            level: "info".into(),
            access: true,
            access_buffer: crate::proxy::access_log::DEFAULT_BUFFER,
        }
    }
}

/// One setting given on the command line, e.g. `("server", "listen", "127.0.0.1:0")`.
pub(crate) type Override = (&'static str, &'static str, String);

impl Config {
    /// The configuration as one line of JSON with every secret (the Redis password) masked,
    /// for the startup log.
    pub(crate) fn redacted_json(&self) -> String {
        let mut c = self.clone();
        c.store.redis_url = redact_url(&c.store.redis_url);
        if c.store.sentinel_password.is_some() {
            c.store.sentinel_password = Some("[redacted]".into());
        }
        serde_json::to_string(&c).unwrap_or_default()
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
