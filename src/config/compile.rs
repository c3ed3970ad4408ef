//! Compiling: every value of a loaded [`Config`] checked and turned into the runtime's own
//! types (the owners' settings: [`Settings`] for the server, [`StoreSettings`],
//! [`CacheSettings`], [`UpstreamSettings`], the route table, …), so nothing on the request path
//! parses config. Every invalid setting is reported at once, each with its field and where its
//! value came from.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use http::{HeaderValue, Uri};

use super::error::{field_err, Check};
use super::{Config, ConfigError, ServerConfig, UpstreamConfig};
use crate::limit::RateLimit;
use crate::policy;
use crate::proxy::upstream::{Protocol, UpstreamTls};
use crate::proxy::{Caller, IdentitySettings, IpNet, UnderscoreHeaders, UpstreamSettings};
use crate::route::{self, Grant, MethodSet, Route, RouteTable, TenantFrom};
use crate::server::tls::{CertificateFiles, ClientAuth, TlsSettings};
use crate::server::{AuthzSettings, Http2Limits, Settings};
use crate::store::redis::{ClusterSettings, RedisSettings, RedisTls, SentinelSettings};
use crate::store::StoreSettings;
use crate::telemetry::LogSettings;
use crate::tls;
use crate::verify::CacheSettings;

impl Config {
    /// Validates everything the proxy needs and builds its runtime settings. Every invalid
    /// setting is reported, each with its field and where its value came from.
    pub fn serve_settings(&self) -> Result<Settings, ConfigError> {
        serve(self)
    }

    /// Validates the store settings alone (all the key-management commands need).
    pub(crate) fn store_settings(&self) -> Result<StoreSettings, ConfigError> {
        self.only(key_store)
    }

    /// Every role a key may be given under this configuration: the routes' roles (built-in and
    /// `[roles.*]`) and the admin API's.
    pub(crate) fn known_roles(&self) -> Result<policy::Roles, ConfigError> {
        self.only(role_names)
    }

    /// Validates `[identity]` into the identity header names.
    pub(crate) fn identity_settings(&self) -> Result<IdentitySettings, ConfigError> {
        self.only(identity_headers)
    }

    /// One compile step on its own, after the errors found while loading.
    fn only<T>(&self, step: fn(&Config) -> Result<T, ConfigError>) -> Result<T, ConfigError> {
        let mut c = Check::new(&self.origins, &self.load_errors);
        let value = c.ok(step(self));
        c.finish(|| value)
    }
}

/// Validates everything the proxy needs and builds its runtime settings. Every invalid
/// setting is reported, each with its field and where its value came from.
fn serve(config: &Config) -> Result<Settings, ConfigError> {
    let s = &config.server;
    let mut c = Check::new(&config.origins, &config.load_errors);
    let routes = c.ok(route_table(config));
    let roles = c.ok(role_names(config));
    let upstream = match &config.upstream.url {
        Some(url) => c
            .ok(upstream_settings(
                &config.upstream,
                &RouteUpstream::default(),
                url,
                "upstream.url",
            ))
            .map(Some),
        None => Some(None),
    };
    let identity = c.ok(identity_headers(config));
    let max_buckets = c.ok(bounded(
        "limits.max_buckets",
        config.limits.max_buckets as usize,
        1,
        1 << 28,
    ));
    let listen = c.ok(addr("server.listen", &s.listen));
    let admin_listen = c.ok(addr("server.admin_listen", &s.admin_listen));
    let authz_caller = c.ok(Caller::parse(&s.authz_caller).ok_or_else(|| {
        field_err(
            "server.authz_caller",
            format!(
                "{:?}: expected \"request\" (Envoy HTTP), \"grpc\" (Envoy gRPC, Istio), \"nginx\" or \"forward_auth\" (Traefik, Caddy)",
                s.authz_caller
            ),
        )
    }));
    let authz_listen = match &s.authz_listen {
        Some(a) => c.ok(addr("server.authz_listen", a)).map(Some),
        None => Some(None),
    };
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
    let http2 = c.ok(http2_limits(s));
    let max_requests_per_connection = c.ok(bounded(
        "server.max_requests_per_connection",
        s.max_requests_per_connection as usize,
        0,
        u32::MAX as usize,
    ));
    let store = c.ok(key_store(config));
    let tls = c.ok(proxy_tls(s));
    let admin_tls = c.ok(admin_tls(s));
    let capacity = c.ok(bounded(
        "cache.capacity",
        config.cache.capacity as usize,
        1,
        1 << 30,
    ));
    let ttl = c.ok(nonzero("cache.ttl", &config.cache.ttl));
    let negative_ttl = c.ok(nonzero("cache.negative_ttl", &config.cache.negative_ttl));
    let trust_while_unsubscribed = c.ok(duration(
        "cache.trust_while_unsubscribed",
        &config.cache.trust_while_unsubscribed,
    )
    .and_then(|trust| {
        // Cached verdicts are trusted only this long after the subscription last answered
        // a health check, so the checks must come more often or the cache would keep
        // lapsing.
        match &store {
            Some(
                StoreSettings::Redis(r)
                | StoreSettings::Sentinel(SentinelSettings { redis: r, .. })
                | StoreSettings::Cluster(ClusterSettings { redis: r, .. }),
            ) if trust <= r.health_check_interval => Err(field_err(
                "cache.trust_while_unsubscribed",
                format!(
                    "{trust:?} must be longer than store.health_check_interval ({:?}): \
                         cached verdicts are trusted only this long after the last answered \
                         health check",
                    r.health_check_interval
                ),
            )),
            _ => Ok(trust),
        }
    }));
    let log = c.ok(logging(config));
    let last_used_interval =
        c.ok(
            nonzero("store.last_used_interval", &config.store.last_used_interval).and_then(|d| {
                if d < Duration::from_secs(1) {
                    return Err(field_err("store.last_used_interval", "must be at least 1s"));
                }
                Ok(d)
            }),
        );
    let operator_tenant = c.ok({
        let t = &config.admin.operator_tenant;
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
            authz: match authz_listen? {
                Some(listen) => Some(AuthzSettings {
                    listen,
                    caller: authz_caller?,
                }),
                None => None,
            },
            shutdown_grace: shutdown_grace?,
            header_read_timeout: header_read_timeout?,
            idle_timeout: idle_timeout?,
            max_connections: max_connections?,
            admin_max_connections: admin_max_connections?,
            max_header_bytes: max_header_bytes?,
            max_requests_per_connection: max_requests_per_connection? as u32,
            http2: http2?,
            workers: workers?,
            headers_with_underscores: headers_with_underscores?,
            trusted_proxies: trusted_proxies?,
            upstream: upstream?,
            routes: routes?,
            limits: crate::limit::LimitSettings {
                headers_when_admitted: config.limits.headers_when_admitted,
                max_buckets: max_buckets? as u64,
            },
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
            tls: tls?,
            admin_tls: admin_tls?,
        })
    })
}

/// A setting that names a file: set and not empty.
fn file_setting(field: &str, v: &Option<String>) -> Result<Option<PathBuf>, ConfigError> {
    match v.as_deref() {
        None => Ok(None),
        Some("") => Err(field_err(field, "must not be empty (unset it instead)")),
        Some(p) => Ok(Some(PathBuf::from(p))),
    }
}

/// A certificate setting and its key setting: both or neither.
fn cert_and_key(
    cert_field: &str,
    cert: &Option<String>,
    key_field: &str,
    key: &Option<String>,
) -> Result<Option<(PathBuf, PathBuf)>, ConfigError> {
    match (
        file_setting(cert_field, cert)?,
        file_setting(key_field, key)?,
    ) {
        (Some(c), Some(k)) => Ok(Some((c, k))),
        (None, None) => Ok(None),
        (Some(_), None) => Err(field_err(key_field, format!("required with {cert_field}"))),
        (None, Some(_)) => Err(field_err(cert_field, format!("required with {key_field}"))),
    }
}

/// `required` or `optional`.
fn client_auth(field: &str, v: &str) -> Result<ClientAuth, ConfigError> {
    ClientAuth::parse(v).ok_or_else(|| {
        field_err(
            field,
            format!("{v:?}: expected \"required\" or \"optional\""),
        )
    })
}

/// The client CA of a listener: only with TLS on it.
fn client_ca(
    field: &str,
    v: &Option<String>,
    tls: bool,
    cert_field: &str,
) -> Result<Option<PathBuf>, ConfigError> {
    let ca = file_setting(field, v)?;
    if ca.is_some() && !tls {
        return Err(field_err(
            field,
            format!("client certificates need TLS on the listener: set {cert_field} too"),
        ));
    }
    Ok(ca)
}

/// The proxy listener's TLS: `tls_cert`/`tls_key` (the default certificate) and
/// `[[server.tls_certificates]]`, client certificates against `tls_client_ca`.
fn proxy_tls(s: &ServerConfig) -> Result<Option<TlsSettings>, ConfigError> {
    let mut certificates = Vec::new();
    if let Some((cert, key)) =
        cert_and_key("server.tls_cert", &s.tls_cert, "server.tls_key", &s.tls_key)?
    {
        certificates.push(CertificateFiles {
            cert,
            key,
            hosts: Vec::new(),
            setting: "server.tls_cert".into(),
        });
    }
    for (i, tc) in s.tls_certificates.iter().enumerate() {
        let f = |field: &str| format!("server.tls_certificates[{i}].{field}");
        let (cert, key) = cert_and_key(
            &f("cert"),
            &Some(tc.cert.clone()),
            &f("key"),
            &Some(tc.key.clone()),
        )?
        .expect("both set");
        for (j, host) in tc.hosts.iter().enumerate() {
            let name = host.strip_prefix("*.").unwrap_or(host);
            if route::parse_host(name).is_err() || name.contains(':') || name.contains('*') {
                return Err(field_err(
                    &format!("server.tls_certificates[{i}].hosts[{j}]"),
                    format!("{host:?} is not a host name like api.example.com or *.example.com"),
                ));
            }
        }
        certificates.push(CertificateFiles {
            cert,
            key,
            hosts: tc.hosts.clone(),
            setting: format!("server.tls_certificates[{i}]"),
        });
    }
    let tls = !certificates.is_empty();
    let client_ca = client_ca(
        "server.tls_client_ca",
        &s.tls_client_ca,
        tls,
        "server.tls_cert",
    )?;
    let client_auth = client_auth("server.tls_client_auth", &s.tls_client_auth)?;
    Ok(tls.then_some(TlsSettings {
        certificates,
        client_ca,
        client_auth,
    }))
}

/// The admin listener's TLS (off unless `admin_tls_cert` is set).
fn admin_tls(s: &ServerConfig) -> Result<Option<TlsSettings>, ConfigError> {
    let pair = cert_and_key(
        "server.admin_tls_cert",
        &s.admin_tls_cert,
        "server.admin_tls_key",
        &s.admin_tls_key,
    )?;
    let client_ca = client_ca(
        "server.admin_tls_client_ca",
        &s.admin_tls_client_ca,
        pair.is_some(),
        "server.admin_tls_cert",
    )?;
    let client_auth = client_auth("server.admin_tls_client_auth", &s.admin_tls_client_auth)?;
    Ok(pair.map(|(cert, key)| TlsSettings {
        certificates: vec![CertificateFiles {
            cert,
            key,
            hosts: Vec::new(),
            setting: "server.admin_tls_cert".into(),
        }],
        client_ca,
        client_auth,
    }))
}

/// Every role a key may be given under this configuration: the routes' roles (built-in and
/// `[roles.*]`) and the admin API's.
fn role_names(config: &Config) -> Result<policy::Roles, ConfigError> {
    let roles = roles(config).map_err(|e| e.located(&config.origins))?;
    Ok(policy::Roles::new(roles.into_iter().map(|(name, ..)| name)))
}

/// The roles: the built-in ones, then `[roles.*]` (which may redefine them).
fn roles(config: &Config) -> Result<Vec<(String, MethodSet, Option<RateLimit>)>, ConfigError> {
    let mut roles: Vec<(String, MethodSet, Option<RateLimit>)> = policy::DEFAULT_ROLES
        .iter()
        .map(|(name, methods)| ((*name).to_owned(), *methods, None))
        .collect();
    for (name, rc) in &config.roles {
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
        let limit = rate_limit(&format!("{f}.rate_limit"), rc.rate_limit.as_deref())?;
        match roles.iter_mut().find(|(n, ..)| n == name) {
            Some(role) => (role.1, role.2) = (methods, limit),
            None => roles.push((name.clone(), methods, limit)),
        }
    }
    Ok(roles)
}

/// A `rate_limit` setting, read; `None` when unset.
fn rate_limit(field: &str, v: Option<&str>) -> Result<Option<RateLimit>, ConfigError> {
    v.map(|v| {
        v.parse()
            .map_err(|e: crate::limit::spec::BadLimit| field_err(field, e.to_string()))
    })
    .transpose()
}

/// Validates `[[routes]]` and `upstream.url` into the route table, most specific first.
fn route_table(config: &Config) -> Result<RouteTable<UpstreamSettings>, ConfigError> {
    let roles = roles(config)?;
    let all_roles = || -> Box<[Grant]> {
        roles
            .iter()
            .map(|(role, methods, limit)| Grant {
                role: role.as_str().into(),
                methods: *methods,
                rate_limit: *limit,
            })
            .collect()
    };
    let default_url = config.upstream.url.as_deref();
    let mut routes = Vec::with_capacity(config.routes.len() + 1);
    for (i, rc) in config.routes.iter().enumerate() {
        let f = |field: &str| format!("routes[{i}].{field}");
        let host = match &rc.host {
            Some(h) => Some(route::parse_host(h).map_err(|m| field_err(&f("host"), m))?),
            None => None,
        };
        let prefix =
            route::parse_prefix(&rc.path_prefix).map_err(|m| field_err(&f("path_prefix"), m))?;
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
        let upstream = upstream_settings(
            &config.upstream,
            &RouteUpstream::of(i, rc),
            url,
            &f("upstream"),
        )?;
        let tenant = match &rc.tenant_from {
            Some(spec) => TenantFrom::parse(spec).map_err(|m| field_err(&f("tenant_from"), m))?,
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
        let route_limit = rate_limit(&f("rate_limit"), rc.rate_limit.as_deref())?;
        if !rc.auth && route_limit.is_some() {
            return Err(field_err(
                &f("rate_limit"),
                "an open route (auth = false) has no key to limit",
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
                    let (role, methods, limit) =
                        roles.iter().find(|(r, ..)| r == name).ok_or_else(|| {
                            let known: Vec<&str> = roles.iter().map(|(r, ..)| r.as_str()).collect();
                            field_err(
                                &format!("routes[{i}].roles[{j}]"),
                                format!("unknown role {name:?}; known roles: {}", known.join(", ")),
                            )
                        })?;
                    Ok(Grant {
                        role: role.as_str().into(),
                        methods: *methods,
                        rate_limit: *limit,
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
            rate_limit: route_limit,
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
            rate_limit: None,
            upstream: upstream_settings(
                &config.upstream,
                &RouteUpstream::default(),
                url,
                "upstream.url",
            )?,
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
fn key_store(config: &Config) -> Result<StoreSettings, ConfigError> {
    let st = &config.store;
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
    let tls = redis_tls(st)?;
    let redis = RedisSettings {
        url: url.clone(),
        tls,
        namespace: ns.clone(),
        timeout: nonzero("store.timeout", &st.timeout)?,
        health_check_interval: nonzero("store.health_check_interval", &st.health_check_interval)?,
    };
    if let Some(nodes) = cluster_nodes(st)? {
        if ns.contains(['{', '}']) {
            return Err(field_err(
                "store.namespace",
                "must not contain { or } with store.cluster_nodes: keygate places its own hash tags",
            ));
        }
        return Ok(StoreSettings::Cluster(ClusterSettings { redis, nodes }));
    }
    match sentinels(st)? {
        Some((sentinels, master)) => Ok(StoreSettings::Sentinel(SentinelSettings {
            redis,
            sentinels,
            master,
            username: st.sentinel_username.clone(),
            password: st.sentinel_password.clone(),
            tls: st.sentinel_tls,
        })),
        None => Ok(StoreSettings::Redis(redis)),
    }
}

/// Most seed nodes of a Redis Cluster (keygate learns the rest from them).
const MAX_CLUSTER_NODES: usize = 64;

/// Validates Redis Cluster mode: the seed nodes' addresses, or none; not with sentinels.
fn cluster_nodes(
    st: &super::StoreConfig,
) -> Result<Option<Vec<redis::ConnectionAddr>>, ConfigError> {
    if st.cluster_nodes.is_empty() {
        return Ok(None);
    }
    if !st.sentinels.is_empty() {
        return Err(field_err(
            "store.cluster_nodes",
            "set together with store.sentinels: choose Redis Cluster or Redis Sentinel",
        ));
    }
    if st.cluster_nodes.len() > MAX_CLUSTER_NODES {
        return Err(field_err(
            "store.cluster_nodes",
            format!("at most {MAX_CLUSTER_NODES} nodes (keygate learns the rest from them)"),
        ));
    }
    st.cluster_nodes
        .iter()
        .map(|s| crate::store::sentinel::parse_addr(s))
        .collect::<Result<Vec<_>, _>>()
        .map(Some)
        .map_err(|m| field_err("store.cluster_nodes", m))
}

/// Most sentinels keygate asks (a deployment runs three or five).
const MAX_SENTINELS: usize = 16;

/// Validates Sentinel mode: the sentinels' addresses and the master's name, or neither.
fn sentinels(
    st: &super::StoreConfig,
) -> Result<Option<(Vec<redis::ConnectionAddr>, String)>, ConfigError> {
    if st.sentinels.is_empty() {
        for (field, set) in [
            ("store.sentinel_master", st.sentinel_master.is_some()),
            ("store.sentinel_username", st.sentinel_username.is_some()),
            ("store.sentinel_password", st.sentinel_password.is_some()),
            ("store.sentinel_tls", st.sentinel_tls),
        ] {
            if set {
                return Err(field_err(field, "set, but store.sentinels is empty"));
            }
        }
        return Ok(None);
    }
    if st.sentinels.len() > MAX_SENTINELS {
        return Err(field_err(
            "store.sentinels",
            format!("at most {MAX_SENTINELS} sentinels"),
        ));
    }
    let addrs = st
        .sentinels
        .iter()
        .map(|s| crate::store::sentinel::parse_addr(s))
        .collect::<Result<Vec<_>, _>>()
        .map_err(|m| field_err("store.sentinels", m))?;
    let master = match st.sentinel_master.as_deref() {
        None => {
            return Err(field_err(
                "store.sentinel_master",
                "required with store.sentinels: the name the sentinels monitor the master under",
            ))
        }
        Some(m) if m.is_empty() || m.len() > 128 || !m.bytes().all(|b| b.is_ascii_graphic()) => {
            return Err(field_err(
                "store.sentinel_master",
                "1 to 128 printable characters, no spaces",
            ))
        }
        Some(m) => m.to_owned(),
    };
    for (field, v) in [
        ("store.sentinel_username", &st.sentinel_username),
        ("store.sentinel_password", &st.sentinel_password),
    ] {
        if v.as_deref().is_some_and(str::is_empty) {
            return Err(field_err(field, "must not be empty"));
        }
    }
    if st.sentinel_tls && !st.redis_url.starts_with("rediss://") {
        return Err(field_err(
            "store.sentinel_tls",
            "needs a rediss:// store.redis_url: TLS to the sentinels goes with TLS to the master",
        ));
    }
    Ok(Some((addrs, master)))
}

/// Validates the HTTP/2 server limits.
fn http2_limits(s: &super::ServerConfig) -> Result<Http2Limits, ConfigError> {
    let streams = bounded(
        "server.http2_max_concurrent_streams",
        s.http2_max_concurrent_streams as usize,
        1,
        1 << 16,
    )?;
    let interval = duration(
        "server.http2_keep_alive_interval",
        &s.http2_keep_alive_interval,
    )?;
    Ok(Http2Limits {
        max_concurrent_streams: streams as u32,
        keep_alive_interval: (!interval.is_zero()).then_some(interval),
        keep_alive_timeout: nonzero(
            "server.http2_keep_alive_timeout",
            &s.http2_keep_alive_timeout,
        )?,
        max_pending_accept_reset_streams: bounded(
            "server.http2_max_pending_accept_reset_streams",
            s.http2_max_pending_accept_reset_streams,
            1,
            1 << 16,
        )?,
        max_local_error_reset_streams: bounded(
            "server.http2_max_local_error_reset_streams",
            s.http2_max_local_error_reset_streams,
            1,
            1 << 20,
        )?,
    })
}

/// Validates the TLS files of a `rediss://` store: only with `rediss://`, a client
/// certificate with its key, each file holding what it should.
fn redis_tls(st: &super::StoreConfig) -> Result<RedisTls, ConfigError> {
    let path = |field: &str, v: &Option<String>| match v.as_deref() {
        Some("") => Err(field_err(field, "must not be empty")),
        v => Ok(v.map(PathBuf::from)),
    };
    let ca = path("store.tls_ca", &st.tls_ca)?;
    let client = match (
        path("store.tls_cert", &st.tls_cert)?,
        path("store.tls_key", &st.tls_key)?,
    ) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) => return Err(field_err("store.tls_key", "store.tls_cert needs it")),
        (None, Some(_)) => return Err(field_err("store.tls_cert", "store.tls_key needs it")),
    };
    let tls = RedisTls { ca, client };
    if tls.is_set() && !st.redis_url.starts_with("rediss://") {
        let field = if tls.ca.is_some() {
            "store.tls_ca"
        } else {
            "store.tls_cert"
        };
        return Err(field_err(
            field,
            "set, but store.redis_url is not a rediss:// URL (TLS)",
        ));
    }
    tls.load()
        .map_err(|(field, e)| field_err(field, e.to_string()))?;
    Ok(tls)
}

/// Validates `[identity]` into the identity header names.
fn identity_headers(config: &Config) -> Result<IdentitySettings, ConfigError> {
    let c = &config.identity;
    IdentitySettings::new(&c.header_prefix, c.forward_authorization)
        .map_err(|m| field_err("identity.header_prefix", m).located(&config.origins))
}

/// The longest access log queue, in lines (about 150 bytes each, allocated at startup).
const MAX_ACCESS_BUFFER: usize = 1 << 20;

/// Validates the logging settings.
fn logging(config: &Config) -> Result<LogSettings, ConfigError> {
    let json = match config.log.format.as_str() {
        "text" => false,
        "json" => true,
        other => {
            return Err(field_err(
                "log.format",
                format!("{other:?}: expected \"text\" or \"json\""),
            ))
        }
    };
    let access_buffer = config.log.access_buffer;
    if !(1..=MAX_ACCESS_BUFFER).contains(&access_buffer) {
        return Err(field_err(
            "log.access_buffer",
            format!("{access_buffer}: expected 1 to {MAX_ACCESS_BUFFER} lines"),
        ));
    }
    Ok(LogSettings {
        json,
        filter: config.log.level.clone(),
        access: config.log.access,
        access_buffer,
    })
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

/// A route's own upstream settings, over `[upstream]`'s.
#[derive(Default)]
struct RouteUpstream<'a> {
    /// The route's index, for field names; `None` for the default route.
    index: Option<usize>,
    protocol: Option<&'a str>,
    tls_ca: Option<&'a str>,
    tls_client_cert: Option<&'a str>,
    tls_client_key: Option<&'a str>,
}

impl<'a> RouteUpstream<'a> {
    fn of(index: usize, rc: &'a super::RouteConfig) -> Self {
        RouteUpstream {
            index: Some(index),
            protocol: rc.upstream_protocol.as_deref(),
            tls_ca: rc.upstream_tls_ca.as_deref(),
            tls_client_cert: rc.upstream_tls_client_cert.as_deref(),
            tls_client_key: rc.upstream_tls_client_key.as_deref(),
        }
    }

    /// The route's value of `upstream.<name>` if it sets one, else `[upstream]`'s, with the
    /// field to name in an error.
    fn pick(
        &self,
        name: &str,
        own: Option<&'a str>,
        default: Option<&'a str>,
    ) -> (Option<&'a str>, String) {
        match (self.index, own) {
            (Some(i), Some(v)) => (Some(v), format!("routes[{i}].upstream_{name}")),
            _ => (default, format!("upstream.{name}")),
        }
    }
}

/// Validates one upstream URL with the `[upstream]` settings and the route's own.
fn upstream_settings(
    c: &UpstreamConfig,
    over: &RouteUpstream<'_>,
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
    let https = scheme == http::uri::Scheme::HTTPS;
    if scheme != http::uri::Scheme::HTTP && !https {
        return Err(field_err(
            f,
            "only http:// and https:// upstreams are supported",
        ));
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
    let (protocol, pf) = over.pick("protocol", over.protocol, Some(&c.protocol));
    let protocol = protocol.unwrap_or("http1");
    let protocol = Protocol::parse(protocol)
        .ok_or_else(|| field_err(&pf, format!("{protocol:?}: expected \"http1\" or \"h2\"")))?;
    let h2_max_streams = bounded("upstream.h2_max_streams", c.h2_max_streams, 1, 1 << 16)?;
    let tls = if https {
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']');
        if rustls::pki_types::ServerName::try_from(host).is_err() {
            return Err(field_err(
                f,
                format!(
                    "{host:?} is not a DNS name or IP address a certificate can be checked for"
                ),
            ));
        }
        Some(upstream_tls(c, over, authority.host(), protocol)?)
    } else {
        // `[upstream]`'s TLS files apply to the https:// upstreams among the routes; a route
        // that sets its own for an http:// upstream is a mistake.
        let own = [
            ("tls_ca", over.tls_ca),
            ("tls_client_cert", over.tls_client_cert),
            ("tls_client_key", over.tls_client_key),
        ];
        if let (Some(i), Some((name, _))) = (over.index, own.iter().find(|(_, v)| v.is_some())) {
            return Err(field_err(
                &format!("routes[{i}].upstream_{name}"),
                "set for an http:// upstream: TLS settings need an https:// URL",
            ));
        }
        None
    };
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
        protocol,
        h2_max_streams,
        tls,
    })
}

/// The TLS client settings of an `https://` upstream: the CA bundle (or the system's trust
/// store) and the client certificate, each error naming its field and file.
fn upstream_tls(
    c: &UpstreamConfig,
    over: &RouteUpstream<'_>,
    host: &str,
    protocol: Protocol,
) -> Result<UpstreamTls, ConfigError> {
    let (ca, ca_field) = over.pick("tls_ca", over.tls_ca, c.tls_ca.as_deref());
    let roots = match ca {
        Some(path) => std::sync::Arc::new(
            tls::load_root_store(Path::new(path))
                .map_err(|e| field_err(&ca_field, e.to_string()))?,
        ),
        None => tls::system_roots().map_err(|e| {
            field_err(
                &ca_field,
                format!("unset, so the system's trust store is used, but {e}; name a CA bundle"),
            )
        })?,
    };
    let (cert, cert_field) = over.pick(
        "tls_client_cert",
        over.tls_client_cert,
        c.tls_client_cert.as_deref(),
    );
    let (key, key_field) = over.pick(
        "tls_client_key",
        over.tls_client_key,
        c.tls_client_key.as_deref(),
    );
    let client = match (cert, key) {
        (Some(cert), Some(key)) => Some((
            tls::load_certificates(Path::new(cert))
                .map_err(|e| field_err(&cert_field, e.to_string()))?,
            tls::load_private_key(Path::new(key))
                .map_err(|e| field_err(&key_field, e.to_string()))?,
        )),
        (None, None) => None,
        (Some(_), None) => return Err(field_err(&key_field, "required with tls_client_cert")),
        (None, Some(_)) => return Err(field_err(&cert_field, "required with tls_client_key")),
    };
    let files = format!(
        "ca={} cert={} key={}",
        ca.unwrap_or("system"),
        cert.unwrap_or("-"),
        key.unwrap_or("-")
    );
    UpstreamTls::new(host, protocol, roots, client, files).map_err(|m| field_err(&cert_field, m))
}
