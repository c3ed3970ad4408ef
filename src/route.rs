//! Routes: the path normaliser and the route table that maps a request (host, normalised path,
//! method) to the one route that decides it.
//!
//! Pure: no IO, no config parsing. The table is built once at startup (see
//! [`crate::config::Config::serve_settings`]) with routes already sorted by specificity, so a
//! lookup is a short scan that allocates nothing.
//!
//! Promises:
//! - Every path a route sees went through [`normalize`]: unreserved escapes decoded, dot
//!   segments removed, duplicate slashes collapsed. Spellings that upstreams disagree about
//!   (an encoded `/` or `\` in a segment, a raw `\`, NUL, `..` above the root, `..;`) are
//!   refused, never guessed, so no spelling of a path reaches a route its rule would deny.
//! - Prefixes match whole segments (`/admin` matches `/admin` and `/admin/x`, not `/adminx`),
//!   and a segment's `;parameters` are ignored for matching, because servlet-style upstreams
//!   strip them: `/admin;x` is decided as `/admin`.

use std::borrow::Cow;

use http::header::HOST;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Uri, Version};

use crate::limit::RateLimit;
use crate::rejection::Rejection;

// ---------------------------------------------------------------------------------------------
// Methods

/// A set of HTTP methods as a bitset: membership is one AND on the request path.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MethodSet(u16);

/// The methods with their own bit; any other (extension) method shares [`MethodSet::OTHER`].
const METHOD_NAMES: [&str; 9] = [
    "GET", "HEAD", "OPTIONS", "POST", "PUT", "PATCH", "DELETE", "TRACE", "CONNECT",
];

impl MethodSet {
    /// No method.
    pub const NONE: MethodSet = MethodSet(0);
    /// Every method, extension methods included.
    pub const ALL: MethodSet = MethodSet(0x3ff);
    /// Safe methods: GET, HEAD, OPTIONS.
    pub const READ: MethodSet = MethodSet(0b111);
    /// Extension methods (anything not in the standard nine).
    const OTHER: u16 = 1 << 9;

    fn bit(method: &str) -> u16 {
        METHOD_NAMES
            .iter()
            .position(|m| *m == method)
            .map_or(Self::OTHER, |i| 1 << i)
    }

    /// Parses one configured method: a standard method name in capitals, or `*` for all.
    pub fn parse(name: &str) -> Option<MethodSet> {
        if name == "*" {
            return Some(Self::ALL);
        }
        METHOD_NAMES
            .contains(&name)
            .then(|| MethodSet(Self::bit(name)))
    }

    /// Whether `method` is in the set.
    pub fn contains(self, method: &Method) -> bool {
        self.0 & Self::bit(method.as_str()) != 0
    }

    /// Both sets' methods.
    pub const fn union(self, other: MethodSet) -> MethodSet {
        MethodSet(self.0 | other.0)
    }

    /// Whether the sets share a method.
    pub const fn intersects(self, other: MethodSet) -> bool {
        self.0 & other.0 != 0
    }
}

// ---------------------------------------------------------------------------------------------
// Path normalisation

/// Unreserved characters (RFC 3986 §2.3): their escapes mean the same as the character.
fn is_unreserved(b: u8) -> bool {
    b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~')
}

/// Escapes that would change the path's structure once an upstream decodes them.
fn is_forbidden_escape(b: u8) -> bool {
    matches!(b, b'/' | b'\\' | 0)
}

fn hex_val(b: u8) -> Option<u8> {
    match b {
        b'0'..=b'9' => Some(b - b'0'),
        b'A'..=b'F' => Some(b - b'A' + 10),
        b'a'..=b'f' => Some(b - b'a' + 10),
        _ => None,
    }
}

/// The part of a segment that names it: everything before its first `;`.
fn segment_name(seg: &str) -> &str {
    seg.split_once(';').map_or(seg, |(name, _)| name)
}

fn is_dot_segment(name: &str) -> bool {
    name == "." || name == ".."
}

/// Whether `path` is already what [`normalize`] would make of it (then it is borrowed as is).
fn is_normal(path: &str) -> bool {
    let b = path.as_bytes();
    if b.first() != Some(&b'/') {
        return false;
    }
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' | 0 => return false,
            b'%' => {
                let (Some(&h), Some(&l)) = (b.get(i + 1), b.get(i + 2)) else {
                    return false;
                };
                // Canonical escapes are upper-case and not of unreserved characters.
                if !(h.is_ascii_digit() || h.is_ascii_uppercase())
                    || !(l.is_ascii_digit() || l.is_ascii_uppercase())
                {
                    return false;
                }
                match (hex_val(h), hex_val(l)) {
                    (Some(h), Some(l)) => {
                        let c = h << 4 | l;
                        if is_unreserved(c) || is_forbidden_escape(c) {
                            return false;
                        }
                    }
                    _ => return false,
                }
                i += 3;
                continue;
            }
            _ => {}
        }
        i += 1;
    }
    let mut segs = path[1..].split('/').peekable();
    while let Some(seg) = segs.next() {
        let last = segs.peek().is_none();
        // Only the last segment may be empty: a trailing slash, or the root itself.
        if (seg.is_empty() && !last) || is_dot_segment(segment_name(seg)) {
            return false;
        }
    }
    true
}

/// Normalises a request path for matching and forwarding: decodes escapes of unreserved
/// characters, upper-cases the hex of the others, removes `.` and `..` segments and collapses
/// duplicate slashes (a trailing slash is kept). Borrows when the path is already normal.
///
/// Refuses (`400 invalid_path`) what upstreams could read differently from keygate: a path
/// not starting with `/`, a broken escape, an encoded `/`, `\` or NUL, a raw `\`, `..` above
/// the root, and dot segments with parameters (`..;`, which servlet containers treat as `..`).
pub fn normalize(path: &str) -> Result<Cow<'_, str>, Rejection> {
    if is_normal(path) {
        return Ok(Cow::Borrowed(path));
    }
    if !path.starts_with('/') {
        return Err(Rejection::InvalidPath);
    }
    let b = path.as_bytes();
    let mut decoded = String::with_capacity(path.len());
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'\\' | 0 => return Err(Rejection::InvalidPath),
            b'%' => {
                let hex = |j: usize| b.get(j).copied().and_then(hex_val);
                let (Some(h), Some(l)) = (hex(i + 1), hex(i + 2)) else {
                    return Err(Rejection::InvalidPath);
                };
                let c = h << 4 | l;
                if is_forbidden_escape(c) {
                    return Err(Rejection::InvalidPath);
                }
                if is_unreserved(c) {
                    decoded.push(c as char);
                } else {
                    decoded.push('%');
                    decoded.push(char::from(b"0123456789ABCDEF"[h as usize]));
                    decoded.push(char::from(b"0123456789ABCDEF"[l as usize]));
                }
                i += 3;
            }
            _ => {
                // Copy the run up to the next escape or refused byte whole; it is valid UTF-8
                // because it starts and ends at ASCII bytes.
                let end = b[i..]
                    .iter()
                    .position(|&c| matches!(c, b'%' | b'\\' | 0))
                    .map_or(b.len(), |n| i + n);
                decoded.push_str(&path[i..end]);
                i = end;
            }
        }
    }

    // RFC 3986 §5.2.4 over segments, with empty segments dropped (duplicate slashes).
    let mut kept: Vec<&str> = Vec::new();
    let mut trailing_slash = false;
    for seg in decoded[1..].split('/') {
        let name = segment_name(seg);
        trailing_slash = true;
        match seg {
            "" | "." => {}
            ".." => {
                if kept.pop().is_none() {
                    return Err(Rejection::InvalidPath);
                }
            }
            _ if is_dot_segment(name) => return Err(Rejection::InvalidPath),
            _ => {
                kept.push(seg);
                trailing_slash = false;
            }
        }
    }
    let mut out = String::with_capacity(decoded.len());
    for seg in &kept {
        out.push('/');
        out.push_str(seg);
    }
    if trailing_slash || kept.is_empty() {
        out.push('/');
    }
    Ok(Cow::Owned(out))
}

// ---------------------------------------------------------------------------------------------
// Routes

/// A role a route admits, with the methods that role may use (resolved at startup).
#[derive(Debug, Clone)]
pub struct Grant {
    /// The role name, as stored on keys.
    pub role: Box<str>,
    /// The role's methods.
    pub methods: MethodSet,
    /// The role's rate limit, resolved into every route that admits it.
    pub rate_limit: Option<RateLimit>,
}

/// Where a route finds the tenant a request names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TenantFrom {
    /// The route is not bound to a tenant.
    Unbound,
    /// A path template such as `/tenants/{tenant}`: the segments it names.
    Path(Box<[TemplateSegment]>),
    /// A request header.
    Header(HeaderName),
}

/// One segment of a tenant path template.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TemplateSegment {
    /// Must equal this segment.
    Literal(Box<str>),
    /// The tenant.
    Tenant,
}

impl TenantFrom {
    /// Parses `header:<name>` or a path template with exactly one `{tenant}` segment.
    pub fn parse(spec: &str) -> Result<TenantFrom, String> {
        if let Some(name) = spec.strip_prefix("header:") {
            if name.contains('_') {
                return Err(format!(
                    "{name:?}: write it with '-' (keygate reads '_' in header names as '-')"
                ));
            }
            return HeaderName::from_bytes(name.trim().as_bytes())
                .map(TenantFrom::Header)
                .map_err(|_| format!("{name:?} is not a header name"));
        }
        let Some(rest) = spec.strip_prefix('/') else {
            return Err(format!(
                "{spec:?}: expected a path template like \"/tenants/{{tenant}}\" or \"header:x-tenant\""
            ));
        };
        let rest = rest.strip_suffix('/').unwrap_or(rest);
        let mut segments = Vec::new();
        for seg in rest.split('/') {
            if seg == "{tenant}" {
                segments.push(TemplateSegment::Tenant);
            } else if seg.is_empty() || is_dot_segment(seg) || !seg.bytes().all(is_prefix_byte) {
                return Err(format!(
                    "{spec:?}: segment {seg:?} must be {{tenant}} or a plain path segment"
                ));
            } else {
                segments.push(TemplateSegment::Literal(seg.into()));
            }
        }
        match segments
            .iter()
            .filter(|s| **s == TemplateSegment::Tenant)
            .count()
        {
            1 => Ok(TenantFrom::Path(segments.into())),
            _ => Err(format!("{spec:?}: needs exactly one {{tenant}} segment")),
        }
    }
}

impl TenantFrom {
    /// Whether a path under `prefix` can match the template: where both name a segment, the
    /// template's literal must be the prefix's. A template that cannot fit its route's prefix
    /// would refuse every request, which is a config mistake, not a policy.
    pub fn fits(&self, prefix: &str, ignore_case: bool) -> bool {
        let TenantFrom::Path(template) = self else {
            return true;
        };
        if prefix == "/" {
            return true;
        }
        prefix[1..]
            .split('/')
            .zip(template.iter())
            .all(|(p, t)| match t {
                TemplateSegment::Tenant => true,
                TemplateSegment::Literal(l) if ignore_case => l.eq_ignore_ascii_case(p),
                TemplateSegment::Literal(l) => **l == *p,
            })
    }
}

/// Bytes a configured path prefix or template literal may hold: no escapes, no parameters, no
/// braces, nothing an upstream might decode into something else.
fn is_prefix_byte(b: u8) -> bool {
    is_unreserved(b) || b"!$&'()*+,=:@".contains(&b)
}

/// Checks a configured path prefix and returns it without a trailing slash (`/` stays `/`).
pub fn parse_prefix(prefix: &str) -> Result<Box<str>, String> {
    let trimmed = match prefix.trim_end_matches('/') {
        "" => "/",
        p => p,
    };
    let valid = trimmed.starts_with('/')
        && (trimmed == "/"
            || trimmed[1..]
                .split('/')
                .all(|s| !s.is_empty() && !is_dot_segment(s) && s.bytes().all(is_prefix_byte)));
    if !valid {
        return Err(format!(
            "{prefix:?} must be a normal path like /api/v1 (no escapes, ';', '.' or '..' segments, or '//')"
        ));
    }
    Ok(trimmed.into())
}

/// One route: what it matches, who it admits, and where it forwards.
#[derive(Debug, Clone)]
pub struct Route<U> {
    /// For logs and errors: `name` from the config, or `routes[i]`.
    pub name: Box<str>,
    /// Lower-case host without port; `None` matches any host.
    pub host: Option<Box<str>>,
    /// Path prefix without a trailing slash (`/` for all).
    pub prefix: Box<str>,
    /// Match the prefix (and tenant template literals) ignoring ASCII case.
    pub ignore_case: bool,
    /// Methods the route matches; `None` for all.
    pub methods: Option<MethodSet>,
    /// Whether a valid key is required (`false`: an open route, e.g. a health check).
    pub auth: bool,
    /// The roles admitted, each with its methods.
    pub grants: Box<[Grant]>,
    /// Where the request names its tenant, if the route is tenant-bound.
    pub tenant: TenantFrom,
    /// The route's own rate limit, on top of the key's role's (`limit/`).
    pub rate_limit: Option<RateLimit>,
    /// Where matched requests go.
    pub upstream: U,
}

impl<U> Route<U> {
    fn matches(&self, host: Option<&str>, path: &str, method: &Method) -> bool {
        if let Some(want) = &self.host {
            if !host.is_some_and(|h| h.eq_ignore_ascii_case(want)) {
                return false;
            }
        }
        if let Some(methods) = self.methods {
            if !methods.contains(method) {
                return false;
            }
        }
        if &*self.prefix == "/" {
            return true;
        }
        let mut segs = path[1..].split('/');
        self.prefix[1..]
            .split('/')
            .all(|p| segs.next().is_some_and(|s| self.same(segment_name(s), p)))
    }

    fn same(&self, a: &str, b: &str) -> bool {
        if self.ignore_case {
            a.eq_ignore_ascii_case(b)
        } else {
            a == b
        }
    }

    /// The tenant the request names, for a tenant-bound route: the template's `{tenant}`
    /// segment (without parameters) or the one value of the header. `None` when the request
    /// names none, or names it ambiguously (two headers).
    ///
    /// `underscores` says whether any header name of the request contains `_` (the caller's
    /// scan of the names knows): only then are the other spellings of the header looked for.
    pub fn tenant<'a>(
        &self,
        path: &'a str,
        headers: &'a HeaderMap,
        underscores: bool,
    ) -> Option<&'a [u8]> {
        match &self.tenant {
            TenantFrom::Unbound => None,
            TenantFrom::Header(name) => {
                tenant_header(headers, name, underscores).map(HeaderValue::as_bytes)
            }
            TenantFrom::Path(template) => {
                let mut segs = path[1..].split('/').map(segment_name);
                let mut tenant = None;
                for t in template.iter() {
                    let seg = segs.next()?;
                    match t {
                        TemplateSegment::Literal(lit) if self.same(seg, lit) => {}
                        TemplateSegment::Literal(_) => return None,
                        TemplateSegment::Tenant if seg.is_empty() => return None,
                        TemplateSegment::Tenant => tenant = Some(seg.as_bytes()),
                    }
                }
                tenant
            }
        }
    }

    /// For a route bound to a tenant header: its configured name and the one value the
    /// request gives it (see [`tenant_header`]).
    pub fn tenant_header<'h>(
        &self,
        headers: &'h HeaderMap,
        underscores: bool,
    ) -> Option<(&HeaderName, &'h HeaderValue)> {
        match &self.tenant {
            TenantFrom::Header(name) => {
                tenant_header(headers, name, underscores).map(|v| (name, v))
            }
            _ => None,
        }
    }

    /// Whether requests must name the key's tenant.
    pub fn binds_tenant(&self) -> bool {
        self.tenant != TenantFrom::Unbound
    }
}

/// The one value of the tenant header `name`, in any spelling: `x_tenant` counts as
/// `x-tenant`, since upstreams that read headers as CGI variables (`HTTP_X_TENANT`) cannot
/// tell them apart, so a request with both is ambiguous, not decided by the one keygate reads.
/// `underscores`: whether any name in `headers` contains `_` (if none, only `name` can match).
pub fn tenant_header<'a>(
    headers: &'a HeaderMap,
    name: &HeaderName,
    underscores: bool,
) -> Option<&'a HeaderValue> {
    fn only<'a>(mut values: impl Iterator<Item = &'a HeaderValue>) -> Option<&'a HeaderValue> {
        let one = values.next()?;
        (values.next().is_none() && !one.is_empty()).then_some(one)
    }
    if underscores {
        only(
            headers
                .iter()
                .filter(|(n, _)| same_header_name(n.as_str(), name.as_str()))
                .map(|(_, v)| v),
        )
    } else {
        only(headers.get_all(name).iter())
    }
}

/// Whether two lower-case header names are the same to an upstream that maps names to CGI
/// variables: equal, with `_` and `-` counted as one character.
pub fn same_header_name(a: &str, b: &str) -> bool {
    a.len() == b.len() && starts_with_header_name(a, b)
}

/// Whether lower-case header name `name` starts with `prefix`, `_` and `-` counted as one.
pub fn starts_with_header_name(name: &str, prefix: &str) -> bool {
    let dash = |c: u8| if c == b'_' { b'-' } else { c };
    name.len() >= prefix.len()
        && name
            .bytes()
            .zip(prefix.bytes())
            .all(|(a, b)| dash(a) == dash(b))
}

/// The routes, most specific first.
#[derive(Debug, Clone)]
pub struct RouteTable<U> {
    routes: Box<[Route<U>]>,
}

impl<U> RouteTable<U> {
    /// Orders routes by specificity: a host-specific route beats any route for all hosts, then
    /// the longest prefix wins, then a route that names methods; ties keep config order.
    pub fn new(mut routes: Vec<Route<U>>) -> Self {
        // A stable sort keeps config order among equals.
        routes.sort_by_key(|r| {
            (
                r.host.is_none(),
                std::cmp::Reverse(r.prefix.len()),
                r.methods.is_none(),
            )
        });
        RouteTable {
            routes: routes.into(),
        }
    }

    /// The most specific route for a request; `path` must be normalised.
    pub fn find(&self, host: Option<&[u8]>, path: &str, method: &Method) -> Option<&Route<U>> {
        let host = host.and_then(host_name);
        self.routes.iter().find(|r| r.matches(host, path, method))
    }

    /// The routes, most specific first.
    pub fn iter(&self) -> impl Iterator<Item = &Route<U>> {
        self.routes.iter()
    }

    /// The same table with each route's upstream turned into another type (e.g. settings into
    /// a pooled client).
    pub fn map_upstreams<V>(self, mut f: impl FnMut(U) -> V) -> RouteTable<V> {
        RouteTable {
            routes: self
                .routes
                .into_vec()
                .into_iter()
                .map(|r| Route {
                    upstream: f(r.upstream),
                    name: r.name,
                    host: r.host,
                    prefix: r.prefix,
                    ignore_case: r.ignore_case,
                    methods: r.methods,
                    auth: r.auth,
                    grants: r.grants,
                    tenant: r.tenant,
                    rate_limit: r.rate_limit,
                })
                .collect(),
        }
    }
}

/// The host a request is for, as its `Host` value (RFC 9112 §3.2, RFC 9113 §8.3.1), or the
/// refusal `400 invalid_host`:
/// - more than one `Host`, or one that is not [`valid_host`], is refused;
/// - an authority in the request target wins over `Host`: the absolute form of HTTP/1.1
///   (`GET http://b.example/ HTTP/1.1`, where `Host` is ignored) and `:authority` of HTTP/2
///   (where a `Host` that names another host makes the request malformed);
/// - an HTTP/1.1 request without `Host` is refused; HTTP/1.0 and HTTP/2 may name no host.
pub fn request_host(
    version: Version,
    uri: &Uri,
    headers: &HeaderMap,
) -> Result<Option<HeaderValue>, Rejection> {
    let mut hosts = headers.get_all(HOST).iter();
    let host = hosts.next();
    if hosts.next().is_some() || host.is_some_and(|h| !valid_host(h.as_bytes())) {
        return Err(Rejection::InvalidHost);
    }
    if let Some(authority) = uri.authority() {
        let target = authority.as_str();
        if !valid_host(target.as_bytes()) {
            return Err(Rejection::InvalidHost);
        }
        let conflict = host.is_some_and(|h| !h.as_bytes().eq_ignore_ascii_case(target.as_bytes()));
        if (version == Version::HTTP_11 && host.is_none())
            || (version == Version::HTTP_2 && conflict)
        {
            return Err(Rejection::InvalidHost);
        }
        return HeaderValue::from_str(target)
            .map(Some)
            .map_err(|_| Rejection::InvalidHost);
    }
    if host.is_none() && version == Version::HTTP_11 {
        return Err(Rejection::InvalidHost);
    }
    Ok(host.cloned())
}

/// Whether a `Host` value (or a request target's authority) is a host keygate routes: a name
/// of letters, digits and `-._~`, an IPv4 address, or an IPv6 literal in brackets, then an
/// optional port of at most 65535. Stricter than RFC 3986's `reg-name` on purpose: no escapes,
/// no user information (`evil@host`), no `,;=!$&'()*+` that upstreams split or decode
/// differently.
pub fn valid_host(host: &[u8]) -> bool {
    let (name, port) = if let Some(rest) = host.strip_prefix(b"[") {
        let Some(end) = rest.iter().position(|&b| b == b']') else {
            return false;
        };
        let literal = &rest[..end];
        if literal.is_empty()
            || !literal
                .iter()
                .all(|&b| b.is_ascii_hexdigit() || b == b':' || b == b'.')
        {
            return false;
        }
        match &rest[end + 1..] {
            [] => (literal, None),
            [b':', port @ ..] => (literal, Some(port)),
            _ => return false,
        }
    } else {
        let (name, port) = match host.iter().position(|&b| b == b':') {
            Some(i) => (&host[..i], Some(&host[i + 1..])),
            None => (host, None),
        };
        if name.is_empty()
            || name.len() > 253
            || !name
                .iter()
                .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~'))
        {
            return false;
        }
        (name, port)
    };
    debug_assert!(!name.is_empty());
    port.is_none_or(|p| {
        (1..=5).contains(&p.len())
            && p.iter().all(u8::is_ascii_digit)
            && std::str::from_utf8(p)
                .ok()
                .and_then(|p| p.parse::<u16>().ok())
                .is_some()
    })
}

/// The host name of a `Host` value: without port and trailing dot. `None` if not text.
fn host_name(host: &[u8]) -> Option<&str> {
    let host = std::str::from_utf8(host).ok()?;
    let name = if host.starts_with('[') {
        // An IPv6 literal keeps its brackets; a port may follow them.
        &host[..host.find(']').map_or(host.len(), |i| i + 1)]
    } else {
        host.split_once(':').map_or(host, |(h, _)| h)
    };
    Some(name.strip_suffix('.').unwrap_or(name))
}

/// Checks a configured host name and returns it lower-cased.
pub fn parse_host(host: &str) -> Result<Box<str>, String> {
    let lower = host.to_ascii_lowercase();
    let ok = if lower.starts_with('[') {
        lower.ends_with(']') && lower.len() > 2
    } else {
        !lower.is_empty()
            && lower.len() <= 253
            && lower
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
            && !lower.starts_with('.')
            && !lower.ends_with('.')
    };
    if !ok {
        return Err(format!(
            "{host:?} is not a host name (no port, scheme or path), e.g. api.example.com"
        ));
    }
    Ok(lower.into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn normal_paths_are_borrowed() {
        for p in [
            "/",
            "/a",
            "/a/b/",
            "/a%20b",
            "/x;y/z",
            "/~user/.well-known/x",
            "/%C3%A9",
        ] {
            assert!(
                matches!(normalize(p), Ok(Cow::Borrowed(_))),
                "{p} was not borrowed"
            );
        }
    }

    #[test]
    fn paths_are_normalised() {
        let cases = [
            ("//admin", "/admin"),
            ("/x/../admin", "/admin"),
            ("/%61dmin", "/admin"),
            ("/admin/.", "/admin/"),
            ("/admin/..", "/"),
            ("/a/./b//c/", "/a/b/c/"),
            ("/a/%2e%2E/b", "/b"),
            ("/a%3fb", "/a%3Fb"),
            ("/a%7e%5f", "/a~_"),
            ("/a/b/../../", "/"),
            ("///", "/"),
            ("/a;x/../b", "/b"),
        ];
        for (input, want) in cases {
            assert_eq!(normalize(input).unwrap(), want, "{input}");
        }
    }

    #[test]
    fn ambiguous_paths_are_refused() {
        for p in [
            "",
            "*",
            "admin",
            "/admin%2f",
            "/admin%2Fx",
            "/a%5cb",
            "/a\\b",
            "/a%00",
            "/..",
            "/a/../..",
            "/%2e%2e/admin",
            "/x/..;/admin",
            "/x/.;a/admin",
            "/a%",
            "/a%4",
            "/a%zz",
        ] {
            assert_eq!(normalize(p), Err(Rejection::InvalidPath), "{p:?}");
        }
    }

    proptest! {
        #[test]
        fn normalising_is_idempotent_and_never_leaves_dots_or_double_slashes(
            segs in proptest::collection::vec(
                prop_oneof![
                    Just(String::new()),
                    Just(".".to_owned()),
                    Just("..".to_owned()),
                    Just("%2e".to_owned()),
                    Just("%2E%2e".to_owned()),
                    Just("%41".to_owned()),
                    Just("%3b".to_owned()),
                    Just("%2f".to_owned()),
                    Just("a;b".to_owned()),
                    "[a-zA-Z0-9._~;%-]{1,6}",
                ],
                0..8,
            )
        ) {
            let path = format!("/{}", segs.join("/"));
            if let Ok(once) = normalize(&path) {
                let twice = normalize(&once).expect("a normal path is valid");
                prop_assert!(matches!(twice, Cow::Borrowed(_)), "{path} -> {once} -> {twice}");
                prop_assert_eq!(&*twice, &*once);
                prop_assert!(once.starts_with('/'));
                prop_assert!(!once.contains("//"), "{} -> {}", path, once);
                for seg in once[1..].split('/') {
                    prop_assert!(!is_dot_segment(segment_name(seg)), "{} -> {}", path, once);
                }
            }
        }

        #[test]
        fn any_ascii_path_normalises_or_is_refused_without_panicking(path in "/[ -~]{0,24}") {
            if let Ok(once) = normalize(&path) {
                prop_assert_eq!(normalize(&once).unwrap(), once.clone());
            }
        }
    }

    #[test]
    fn hosts_are_validated() {
        for ok in [
            "a.example",
            "A.Example:8080",
            "192.0.2.1",
            "192.0.2.1:1",
            "[::1]",
            "[::1]:65535",
            "[2001:db8::1]",
            "under_score.example",
            "a.example.",
        ] {
            assert!(valid_host(ok.as_bytes()), "{ok}");
        }
        for bad in [
            "",
            ":80",
            "a.example:",
            "a.example:65536",
            "a.example:80x",
            "a.example:123456",
            "u@a.example",
            "a.example,b.example",
            "a b",
            "a/b",
            "a%2eb",
            "[::1",
            "[]",
            "[::1]x",
            "[::1]:",
            "[fe80::1%eth0]",
        ] {
            assert!(!valid_host(bad.as_bytes()), "{bad:?}");
        }
    }

    #[test]
    fn the_request_target_authority_wins_over_host() {
        let mut h = HeaderMap::new();
        let origin: Uri = "/x".parse().unwrap();
        let absolute: Uri = "http://b.example/x".parse().unwrap();
        assert_eq!(
            request_host(Version::HTTP_11, &origin, &h),
            Err(Rejection::InvalidHost)
        );
        assert_eq!(request_host(Version::HTTP_10, &origin, &h), Ok(None));
        assert_eq!(request_host(Version::HTTP_2, &origin, &h), Ok(None));
        h.insert(HOST, HeaderValue::from_static("a.example"));
        let host = |v, uri: &Uri, h: &HeaderMap| request_host(v, uri, h).map(|o| o.unwrap());
        assert_eq!(host(Version::HTTP_11, &origin, &h).unwrap(), "a.example");
        assert_eq!(host(Version::HTTP_11, &absolute, &h).unwrap(), "b.example");
        assert_eq!(
            request_host(Version::HTTP_2, &absolute, &h),
            Err(Rejection::InvalidHost)
        );
        h.insert(HOST, HeaderValue::from_static("B.example"));
        assert_eq!(host(Version::HTTP_2, &absolute, &h).unwrap(), "b.example");
        h.append(HOST, HeaderValue::from_static("B.example"));
        assert_eq!(
            request_host(Version::HTTP_11, &origin, &h),
            Err(Rejection::InvalidHost)
        );
    }

    #[test]
    fn method_sets_hold_their_methods() {
        let get = MethodSet::parse("GET").unwrap();
        assert!(get.contains(&Method::GET));
        assert!(!get.contains(&Method::POST));
        assert!(MethodSet::ALL.contains(&Method::from_bytes(b"PURGE").unwrap()));
        assert!(!MethodSet::READ.contains(&Method::from_bytes(b"PURGE").unwrap()));
        assert_eq!(MethodSet::parse("get"), None);
        assert_eq!(MethodSet::parse("*"), Some(MethodSet::ALL));
    }

    fn route(host: Option<&str>, prefix: &str, upstream: u8) -> Route<u8> {
        Route {
            name: format!("{host:?}{prefix}").into(),
            host: host.map(Into::into),
            prefix: parse_prefix(prefix).unwrap(),
            ignore_case: false,
            methods: None,
            auth: true,
            grants: Box::new([]),
            tenant: TenantFrom::Unbound,
            rate_limit: None,
            upstream,
        }
    }

    #[test]
    fn the_most_specific_route_wins() {
        let t = RouteTable::new(vec![
            route(None, "/", 0),
            route(None, "/api", 1),
            route(None, "/api/admin", 2),
            route(Some("b.example"), "/", 3),
        ]);
        let find = |host: Option<&str>, path| {
            t.find(host.map(str::as_bytes), path, &Method::GET)
                .map(|r| r.upstream)
        };
        assert_eq!(find(None, "/"), Some(0));
        assert_eq!(find(None, "/apix"), Some(0));
        assert_eq!(find(None, "/api"), Some(1));
        assert_eq!(find(None, "/api/"), Some(1));
        assert_eq!(find(None, "/api;v=1/x"), Some(1));
        assert_eq!(find(None, "/api/admin/x"), Some(2));
        assert_eq!(find(Some("B.example:8080"), "/api/admin"), Some(3));
        assert_eq!(find(Some("b.example."), "/"), Some(3));
        assert_eq!(find(Some("c.example"), "/api"), Some(1));
        let only_api = RouteTable::new(vec![route(None, "/api", 1)]);
        assert!(only_api.find(None, "/other", &Method::GET).is_none());
    }

    #[test]
    fn methods_narrow_a_match() {
        let mut post = route(None, "/x", 1);
        post.methods = MethodSet::parse("POST");
        let t = RouteTable::new(vec![route(None, "/x", 0), post]);
        assert_eq!(t.find(None, "/x", &Method::POST).unwrap().upstream, 1);
        assert_eq!(t.find(None, "/x", &Method::GET).unwrap().upstream, 0);
    }

    #[test]
    fn tenants_come_from_the_template_or_the_header() {
        let mut r = route(None, "/tenants", 0);
        r.tenant = TenantFrom::parse("/tenants/{tenant}").unwrap();
        let h = HeaderMap::new();
        assert_eq!(r.tenant("/tenants/acme/x", &h, false), Some(&b"acme"[..]));
        assert_eq!(r.tenant("/tenants/acme;v=1", &h, false), Some(&b"acme"[..]));
        assert_eq!(r.tenant("/tenants", &h, false), None);
        assert_eq!(r.tenant("/tenants/", &h, false), None);
        assert_eq!(r.tenant("/other/acme", &h, false), None);

        r.tenant = TenantFrom::parse("header:X-Tenant").unwrap();
        let mut h = HeaderMap::new();
        assert_eq!(r.tenant("/", &h, false), None);
        h.append("x-tenant", "acme".parse().unwrap());
        assert_eq!(r.tenant("/", &h, false), Some(&b"acme"[..]));
        h.append("x-tenant", "other".parse().unwrap());
        assert_eq!(r.tenant("/", &h, false), None, "two tenants are ambiguous");

        // Every spelling of the header counts: one value in any spelling is the tenant, two
        // are ambiguous.
        let mut h = HeaderMap::new();
        h.append("x_tenant", "acme".parse().unwrap());
        assert_eq!(r.tenant("/", &h, true), Some(&b"acme"[..]));
        h.append("x-tenant", "acme".parse().unwrap());
        assert_eq!(r.tenant("/", &h, true), None);
        assert!(same_header_name("x_keygate-tenant", "x-keygate-tenant"));
        assert!(!same_header_name("x-keygate-tenant", "x-keygate-tenants"));
        assert!(starts_with_header_name("x_keygate_role", "x-keygate-"));
        assert!(!starts_with_header_name("x-keygat", "x-keygate-"));
    }

    #[test]
    fn templates_must_fit_their_prefix() {
        let t = TenantFrom::parse("/api/tenants/{tenant}").unwrap();
        for prefix in ["/", "/api", "/api/tenants", "/api/tenants/acme/x"] {
            assert!(t.fits(prefix, false), "{prefix}");
        }
        assert!(!t.fits("/tenants", false));
        assert!(!t.fits("/API", false));
        assert!(t.fits("/API", true));
        assert!(TenantFrom::parse("header:x-tenant")
            .unwrap()
            .fits("/any", false));
    }

    #[test]
    fn bad_templates_prefixes_and_hosts_are_refused() {
        for t in [
            "tenants/{tenant}",
            "/tenants",
            "/{tenant}/{tenant}",
            "/t/{tenantx}",
            "/t//{tenant}",
            "/../{tenant}",
            "header:bad header",
            "header:x_tenant",
        ] {
            assert!(TenantFrom::parse(t).is_err(), "{t}");
        }
        for p in ["admin", "/a//b", "/a/../b", "/a%2f", "/a;b", "/./a"] {
            assert!(parse_prefix(p).is_err(), "{p}");
        }
        assert_eq!(&*parse_prefix("/api/").unwrap(), "/api");
        assert_eq!(&*parse_prefix("/").unwrap(), "/");
        for h in ["", "http://x", "a:80", "a/b", ".a"] {
            assert!(parse_host(h).is_err(), "{h}");
        }
        assert_eq!(&*parse_host("API.Example.com").unwrap(), "api.example.com");
    }
}
