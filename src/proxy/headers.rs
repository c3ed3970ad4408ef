//! Header hygiene of a request: what its head looks like when it reaches the upstream (the
//! `rewrite` phase of [`super`]). The hop-by-hop rule, which responses follow too, is in
//! `hop.rs`; the forwarding headers and trusted proxies are [`super::forwarded`].
//!
//! Header rules, in this order (the order is what makes them safe):
//! 1. one pass over the names ([`scan_request_headers`]) finds what the rules below have to
//!    do, so a request that needs none of them costs that pass and nothing else;
//! 2. hop-by-hop headers go, with every header the client named in `Connection`;
//! 3. `Authorization` goes (unless configured to be forwarded);
//! 4. every client header with the identity prefix goes, and so do names with `_` (unless
//!    allowed), read as upstreams that map names to CGI variables read them: `x_keygate_tenant`
//!    is `HTTP_X_KEYGATE_TENANT`, the same as `x-keygate-tenant`; method overrides go, and so
//!    do the client addresses an untrusted peer asserts;
//! 5. keygate's identity headers, the tenant header the decision was made on,
//!    `X-Forwarded-*`, `Host` and the request id are set.
//!
//! Because step 5 comes last, no client header (not even `Connection: x-keygate-tenant` or
//! `Connection: x-tenant`) can remove or replace a header keygate adds or decided on.

use http::header::{HeaderName, AUTHORIZATION, HOST};
use http::uri::PathAndQuery;
use http::{HeaderMap, HeaderValue, Uri};

use super::forwarded::{client_addresses, set_forwarding_headers};
use super::hop::{hop_by_hop, remove_hop_by_hop, UPGRADE_BIT};
use super::request_id::X_REQUEST_ID;
use super::upstream::UpstreamSettings;
use crate::identity::{Identity, Part};
use crate::rejection::Rejection;
use crate::route::{same_header_name, starts_with_header_name};

/// What one pass over a request's header names found: which hop-by-hop headers are present
/// and which of the other rules have work to do. A few bits, nothing allocated.
#[derive(Debug, Clone, Copy)]
pub struct HeaderScan {
    /// Bit `i`: `hop_by_hop()[i]` is present.
    hop: u16,
    found: u8,
    underscores: UnderscoreHeaders,
}

/// A client header in the identity namespace (in any spelling).
const IDENTITY: u8 = 1 << 0;
/// A name with `_`.
const UNDERSCORE: u8 = 1 << 1;
/// A method-override header.
const OVERRIDE: u8 = 1 << 2;
/// `Forwarded` or `X-Real-IP`: a client address a peer asserts.
const CLIENT_ADDRESS: u8 = 1 << 3;

static X_HTTP_METHOD_OVERRIDE: HeaderName = HeaderName::from_static("x-http-method-override");
static X_HTTP_METHOD: HeaderName = HeaderName::from_static("x-http-method");
static X_METHOD_OVERRIDE: HeaderName = HeaderName::from_static("x-method-override");

/// Headers with which a client asks upstreams that honour them to take a request as another
/// method: a read-only key's `GET` would become a `DELETE` that keygate never authorised.
/// They are always removed.
fn method_overrides() -> [&'static HeaderName; 3] {
    [&X_HTTP_METHOD_OVERRIDE, &X_HTTP_METHOD, &X_METHOD_OVERRIDE]
}

impl HeaderScan {
    /// Whether the request has an `Upgrade` header (known from the scan, at no cost).
    pub(super) fn upgrade(&self) -> bool {
        self.hop & UPGRADE_BIT != 0
    }

    /// Whether some header name contains `_`.
    pub(super) fn underscores(&self) -> bool {
        self.found & UNDERSCORE != 0
    }

    /// The refusal the request gets for its header names, if any.
    pub(super) fn refusal(&self) -> Option<Rejection> {
        (self.underscores() && self.underscores == UnderscoreHeaders::Reject)
            .then_some(Rejection::InvalidHeader)
    }
}

/// One pass over the request's header names, under identity prefix `prefix` and the policy
/// for names with `_`.
pub fn scan_request_headers(
    headers: &HeaderMap,
    prefix: &str,
    underscores: UnderscoreHeaders,
) -> HeaderScan {
    let hop = hop_by_hop();
    let mut scan = HeaderScan {
        hop: 0,
        found: 0,
        underscores,
    };
    for name in headers.keys() {
        if let Some(i) = hop.iter().position(|h| *h == name) {
            scan.hop |= 1 << i;
            continue;
        }
        let s = name.as_str();
        if s.as_bytes().contains(&b'_') {
            scan.found |= UNDERSCORE;
        }
        if starts_with_header_name(s, prefix) {
            scan.found |= IDENTITY;
        } else if method_overrides().contains(&name) {
            scan.found |= OVERRIDE;
        } else if client_addresses().contains(&name) {
            scan.found |= CLIENT_ADDRESS;
        }
    }
    scan
}

/// Names that, spelt with `_`, would read to a CGI-style upstream like a header keygate sets,
/// strips or decides on; they are never forwarded, whatever `server.headers_with_underscores`
/// says.
const MANAGED: [&str; 13] = [
    "x-forwarded-for",
    "x-forwarded-proto",
    "x-forwarded-host",
    "x-request-id",
    "x-real-ip",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "keep-alive",
    "proxy-connection",
    "proxy-authenticate",
    "proxy-authorization",
    "transfer-encoding",
];

/// Client headers removed by a rewrite, by kind (for `keygate_request_headers_removed_total`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Removed {
    /// Names in the identity namespace, in any spelling.
    pub identity: u32,
    /// Other names with `_`.
    pub underscore: u32,
    /// Method-override headers.
    pub method_override: u32,
}

/// Removes what the scan flagged: identity headers in any spelling, method overrides, client
/// addresses asserted by an untrusted peer, and names with `_` (all of them, or under `allow`
/// those that read like a managed header). Allocates only when something is to go.
fn remove_flagged(
    headers: &mut HeaderMap,
    scan: &HeaderScan,
    prefix: &str,
    trusted: bool,
) -> Removed {
    let mut removed = Removed::default();
    let mut wanted = IDENTITY | UNDERSCORE | OVERRIDE;
    if !trusted {
        wanted |= CLIENT_ADDRESS;
    }
    if scan.found & wanted == 0 {
        return removed;
    }
    let allow = scan.underscores == UnderscoreHeaders::Allow;
    let doomed: Vec<HeaderName> = headers
        .keys()
        .filter(|n| {
            let s = n.as_str();
            if starts_with_header_name(s, prefix) {
                removed.identity += 1;
                true
            } else if method_overrides().contains(n) {
                removed.method_override += 1;
                true
            } else if !trusted && client_addresses().contains(n) {
                true
            } else if s.contains('_') && (!allow || MANAGED.iter().any(|m| same_header_name(s, m)))
            {
                removed.underscore += 1;
                true
            } else {
                false
            }
        })
        .cloned()
        .collect();
    for name in doomed {
        headers.remove(name);
    }
    removed
}

/// Per-request facts the rewrite needs besides the headers.
pub struct Forwarded<'a> {
    /// The client's address, as a header value (made once per connection by
    /// [`ip_value`](super::forwarded::ip_value)).
    pub client_ip: &'a HeaderValue,
    /// Whether the client is a trusted proxy (`server.trusted_proxies`), whose
    /// `X-Forwarded-*`, `Forwarded` and `X-Real-IP` are kept.
    pub trusted: bool,
    /// `http` or `https`, as the client spoke to keygate.
    pub proto: &'static str,
    /// The host the client asked for (`Host`, or the URI authority under HTTP/2).
    pub host: Option<HeaderValue>,
    /// The request id.
    pub request_id: &'a HeaderValue,
    /// What [`scan_request_headers`] found in the request's names.
    pub scan: HeaderScan,
    /// The tenant header the route's decision was made on, with its value: it reaches the
    /// upstream in the configured spelling and as decided, whatever the client did.
    pub tenant_header: Option<(&'a HeaderName, HeaderValue)>,
    /// The subject of the connection's verified TLS client certificate, if any.
    pub client_cert: Option<&'a HeaderValue>,
}

/// Rewrites a request head for the upstream (see the module docs for the order). `identity` is
/// `None` on an open route: client identity headers are still removed, none are added.
/// Returns what it removed, for the metrics.
pub fn rewrite_request_headers(
    headers: &mut HeaderMap,
    identity: Option<&Identity>,
    ids: &IdentitySettings,
    upstream: &UpstreamSettings,
    fwd: &Forwarded<'_>,
) -> Removed {
    remove_hop_by_hop(headers, fwd.scan.hop);
    if !ids.forward_authorization {
        headers.remove(AUTHORIZATION);
    }
    let removed = remove_flagged(headers, &fwd.scan, &ids.prefix, fwd.trusted);

    if let Some((name, value)) = &fwd.tenant_header {
        if fwd.scan.underscores() {
            let spellings: Vec<HeaderName> = headers
                .keys()
                .filter(|n| same_header_name(n.as_str(), name.as_str()))
                .cloned()
                .collect();
            for n in spellings {
                headers.remove(n);
            }
        }
        headers.insert((*name).clone(), value.clone());
    }

    if let Some(identity) = identity {
        insert_identity(headers, identity, ids);
    }

    // The transport's identity, whether or not the route needs a key.
    if let Some(subject) = fwd.client_cert {
        headers.insert(ids.client_cert_subject.clone(), subject.clone());
    }

    set_forwarding_headers(
        headers,
        fwd.client_ip,
        fwd.trusted,
        fwd.proto,
        fwd.host.as_ref(),
    );
    if !upstream.preserve_host || fwd.host.is_none() {
        headers.insert(HOST, upstream.host_header.clone());
    } else if let Some(h) = &fwd.host {
        headers.insert(HOST, h.clone());
    }
    headers.insert(X_REQUEST_ID.clone(), fwd.request_id.clone());
    removed
}

/// Sets keygate's identity headers for `identity`, replacing any of the same names: on the
/// upstream request, and on the decision endpoint's answer to a gateway.
pub(super) fn insert_identity(
    headers: &mut HeaderMap,
    identity: &Identity,
    ids: &IdentitySettings,
) {
    headers.insert(ids.key_id.clone(), identity.header(Part::KeyId));
    headers.insert(ids.tenant.clone(), identity.header(Part::Tenant));
    headers.insert(ids.role.clone(), identity.header(Part::Role));
    headers.insert(ids.subject.clone(), identity.header(Part::Subject));
    headers.insert(
        ids.subject_kind.clone(),
        HeaderValue::from_static(identity.kind().as_str()),
    );
}

/// The request headers a gateway must remove before forwarding an allowed request, as one
/// comma-separated value: `Authorization` (unless configured to be forwarded) and every header
/// in the identity namespace, in any spelling, that the client sent. `None` when there is none.
pub(super) fn to_remove(headers: &HeaderMap, ids: &IdentitySettings) -> Option<HeaderValue> {
    let mut names = String::new();
    let mut add = |name: &str| {
        if !names.is_empty() {
            names.push_str(", ");
        }
        names.push_str(name);
    };
    if !ids.forward_authorization && headers.contains_key(AUTHORIZATION) {
        add(AUTHORIZATION.as_str());
    }
    for name in headers.keys() {
        if starts_with_header_name(name.as_str(), &ids.prefix) {
            add(name.as_str());
        }
    }
    if names.is_empty() {
        return None;
    }
    HeaderValue::from_str(&names).ok()
}

/// Replaces a request's path with its normalised form, keeping the query as the client sent it.
pub(super) fn set_path(uri: &mut Uri, path: &str) -> Result<(), Rejection> {
    let pq = match uri.query() {
        Some(q) => PathAndQuery::try_from(format!("{path}?{q}")),
        None => PathAndQuery::try_from(path),
    }
    .map_err(|_| Rejection::InvalidPath)?;
    let mut parts = std::mem::take(uri).into_parts();
    parts.path_and_query = Some(pq);
    *uri = Uri::from_parts(parts).map_err(|_| Rejection::InvalidPath)?;
    Ok(())
}

/// The identity header names, built once from the configured prefix.
#[derive(Debug, Clone)]
pub struct IdentitySettings {
    /// The lowercase prefix, e.g. `x-keygate-`.
    pub prefix: String,
    /// `<prefix>key-id`.
    pub key_id: HeaderName,
    /// `<prefix>tenant`.
    pub tenant: HeaderName,
    /// `<prefix>role`.
    pub role: HeaderName,
    /// `<prefix>subject`.
    pub subject: HeaderName,
    /// `<prefix>subject-kind`.
    pub subject_kind: HeaderName,
    /// `<prefix>client-cert-subject`: the verified TLS client certificate's subject.
    pub client_cert_subject: HeaderName,
    /// Forward `Authorization` upstream.
    pub forward_authorization: bool,
}

impl IdentitySettings {
    /// The identity header names under `prefix` (`identity.header_prefix`); the error says
    /// what is wrong with the prefix.
    pub fn new(prefix: &str, forward_authorization: bool) -> Result<Self, String> {
        let prefix = prefix.to_ascii_lowercase();
        if prefix.len() < 2 || prefix.len() > 64 {
            return Err("must be 2 to 64 characters".into());
        }
        if prefix.contains('_') {
            return Err(format!(
                "{prefix:?}: write it with '-' (keygate reads '_' in header names as '-')"
            ));
        }
        let name = |suffix: &str| {
            HeaderName::from_bytes(format!("{prefix}{suffix}").as_bytes())
                .map_err(|_| format!("{prefix:?} is not a header name prefix"))
        };
        Ok(IdentitySettings {
            key_id: name("key-id")?,
            tenant: name("tenant")?,
            role: name("role")?,
            subject: name("subject")?,
            subject_kind: name("subject-kind")?,
            client_cert_subject: name("client-cert-subject")?,
            prefix,
            forward_authorization,
        })
    }
}

/// The default identity header prefix (`identity.header_prefix`).
pub(crate) const DEFAULT_PREFIX: &str = "x-keygate-";

impl Default for IdentitySettings {
    fn default() -> Self {
        IdentitySettings::new(DEFAULT_PREFIX, false).expect("default prefix is valid")
    }
}

/// What keygate does with a client header whose name contains `_`. Upstreams that map header
/// names to CGI variables (Python WSGI, PHP, Rack: `X_Tenant` and `X-Tenant` are both
/// `HTTP_X_TENANT`) cannot tell such a name from the one with `-`, so whatever the choice, a
/// name that reads like one keygate sets or decides on is never passed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnderscoreHeaders {
    /// Removed before forwarding (nginx's default).
    Drop,
    /// The request is refused with `400 invalid_header`.
    Reject,
    /// Forwarded, except names that read like a header keygate sets, strips or decides on.
    Allow,
}

impl UnderscoreHeaders {
    /// Parses `server.headers_with_underscores`.
    pub fn parse(v: &str) -> Option<Self> {
        match v {
            "drop" => Some(UnderscoreHeaders::Drop),
            "reject" => Some(UnderscoreHeaders::Reject),
            "allow" => Some(UnderscoreHeaders::Allow),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proxy::forwarded::ip_value;
    use crate::store::KeyRecord;

    fn identity() -> Identity {
        Identity::from_record(&KeyRecord::example(crate::key::KeyDigest([0; 32]))).unwrap()
    }

    fn upstream() -> UpstreamSettings {
        UpstreamSettings {
            scheme: http::uri::Scheme::HTTP,
            authority: http::uri::Authority::from_static("10.0.0.1:3000"),
            host_header: HeaderValue::from_static("10.0.0.1:3000"),
            base_path: String::new(),
            connect_timeout: std::time::Duration::from_secs(2),
            timeout: std::time::Duration::from_secs(30),
            pool_idle_timeout: std::time::Duration::from_secs(90),
            pool_max_idle: 256,
            preserve_host: false,
            readiness_check: true,
            protocol: crate::proxy::upstream::Protocol::Http1,
            h2_max_streams: 100,
            tls: None,
        }
    }

    fn rewrite(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        rewrite_with(&mut h, UnderscoreHeaders::Drop, false);
        h
    }

    fn rewrite_with(h: &mut HeaderMap, underscores: UnderscoreHeaders, trusted: bool) -> Removed {
        let ids = IdentitySettings::default();
        let rid = HeaderValue::from_static("rid-1");
        let scan = scan_request_headers(h, &ids.prefix, underscores);
        rewrite_request_headers(
            h,
            Some(&identity()),
            &ids,
            &upstream(),
            &Forwarded {
                client_ip: &ip_value("192.0.2.7".parse().unwrap()),
                trusted,
                proto: "http",
                host: Some(HeaderValue::from_static("api.example")),
                request_id: &rid,
                scan,
                tenant_header: None,
                client_cert: None,
            },
        )
    }

    fn headers(pairs: &[(&str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(
                HeaderName::from_bytes(k.as_bytes()).unwrap(),
                HeaderValue::from_str(v).unwrap(),
            );
        }
        h
    }

    #[test]
    fn identity_headers_in_any_spelling_are_removed_under_every_policy() {
        for policy in [UnderscoreHeaders::Drop, UnderscoreHeaders::Allow] {
            let mut h = headers(&[
                ("x_keygate_tenant", "evil"),
                ("x-keygate_role", "admin"),
                ("x_keygate-subject", "root"),
                ("x_forwarded_for", "10.9.9.9"),
                ("x_custom", "1"),
                ("x-custom", "2"),
            ]);
            let removed = rewrite_with(&mut h, policy, false);
            let cgi: Vec<String> = h.keys().map(|k| k.as_str().replace('_', "-")).collect();
            assert_eq!(h["x-keygate-tenant"], "acme", "{policy:?}");
            assert_eq!(
                cgi.iter().filter(|k| k.starts_with("x-keygate-")).count(),
                5,
                "{policy:?}: {cgi:?}"
            );
            assert_eq!(
                cgi.iter().filter(|k| *k == "x-forwarded-for").count(),
                1,
                "{policy:?}: {cgi:?}"
            );
            assert_eq!(h["x-custom"], "2");
            assert_eq!(removed.identity, 3, "{policy:?}");
            let custom_kept = h.contains_key("x_custom");
            assert_eq!(custom_kept, policy == UnderscoreHeaders::Allow);
            assert_eq!(removed.underscore, if custom_kept { 1 } else { 2 });
        }
    }

    #[test]
    fn a_scan_without_matches_asks_for_nothing() {
        let h = headers(&[("user-agent", "x"), ("accept", "*/*"), ("host", "a")]);
        let scan = scan_request_headers(&h, "x-keygate-", UnderscoreHeaders::Reject);
        assert_eq!((scan.hop, scan.found), (0, 0));
        assert!(scan.refusal().is_none());
        let h = headers(&[("a_b", "1")]);
        let scan = scan_request_headers(&h, "x-keygate-", UnderscoreHeaders::Reject);
        assert_eq!(scan.refusal(), Some(Rejection::InvalidHeader));
    }

    #[test]
    fn the_tenant_header_is_set_as_decided_after_connection_tokens() {
        let mut h = headers(&[
            ("x-tenant", "acme"),
            ("x_tenant", "acme"),
            ("connection", "x-tenant, authorization"),
            ("authorization", "Bearer k"),
        ]);
        let ids = IdentitySettings {
            forward_authorization: true,
            ..IdentitySettings::default()
        };
        let rid = HeaderValue::from_static("rid-1");
        let name = HeaderName::from_static("x-tenant");
        let scan = scan_request_headers(&h, &ids.prefix, UnderscoreHeaders::Allow);
        rewrite_request_headers(
            &mut h,
            Some(&identity()),
            &ids,
            &upstream(),
            &Forwarded {
                client_ip: &ip_value("192.0.2.7".parse().unwrap()),
                trusted: false,
                proto: "http",
                host: None,
                request_id: &rid,
                scan,
                tenant_header: Some((&name, HeaderValue::from_static("acme"))),
                client_cert: None,
            },
        );
        assert_eq!(h.get_all("x-tenant").iter().count(), 1);
        assert!(!h.contains_key("x_tenant"));
        assert_eq!(
            h["authorization"], "Bearer k",
            "Connection cannot remove it"
        );
    }

    #[test]
    fn identity_headers_replace_spoofed_ones() {
        let h = rewrite(&[
            ("x-keygate-tenant", "evil"),
            ("X-Keygate-Admin", "yes"),
            ("authorization", "Bearer x"),
        ]);
        assert_eq!(h["x-keygate-tenant"], "acme");
        assert_eq!(h.get_all("x-keygate-tenant").iter().count(), 1);
        assert!(h.get("x-keygate-admin").is_none());
        assert!(h.get(AUTHORIZATION).is_none());
        assert_eq!(h["x-keygate-subject-kind"], "user");
    }

    #[test]
    fn connection_cannot_remove_identity_headers() {
        let h = rewrite(&[
            ("connection", "x-keygate-tenant, x-custom"),
            ("x-custom", "1"),
            ("keep-alive", "timeout=5"),
            ("te", "trailers"),
        ]);
        assert_eq!(h["x-keygate-tenant"], "acme");
        for gone in ["connection", "x-custom", "keep-alive", "te"] {
            assert!(h.get(gone).is_none(), "{gone} forwarded");
        }
    }

    #[test]
    fn connection_tokens_match_any_case_and_junk_is_ignored() {
        let h = rewrite(&[
            ("connection", "X-Custom, , keep-alive,not a name"),
            ("connection", "X-Other"),
            ("x-custom", "1"),
            ("x-other", "2"),
            ("x-kept", "3"),
        ]);
        for gone in ["connection", "x-custom", "x-other"] {
            assert!(h.get(gone).is_none(), "{gone} forwarded");
        }
        assert_eq!(h["x-kept"], "3");
    }

    #[test]
    fn forwarded_headers_are_set() {
        let claims = [
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "198.51.100.2"),
            ("x-forwarded-proto", "https"),
            ("x-forwarded-host", "claimed.example"),
            ("forwarded", "for=198.51.100.1"),
            ("x-real-ip", "198.51.100.1"),
            ("x-http-method-override", "DELETE"),
        ];
        let mut trusted = headers(&claims);
        let removed = rewrite_with(&mut trusted, UnderscoreHeaders::Drop, true);
        assert_eq!(removed.method_override, 1);
        assert_eq!(
            trusted["x-forwarded-for"],
            "198.51.100.1, 198.51.100.2, 192.0.2.7"
        );
        assert_eq!(trusted["x-forwarded-proto"], "https");
        assert_eq!(trusted["x-forwarded-host"], "claimed.example");
        assert_eq!(trusted["forwarded"], "for=198.51.100.1");
        assert!(!trusted.contains_key("x-http-method-override"));

        let h = rewrite(&claims);
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert!(!h.contains_key("forwarded") && !h.contains_key("x-real-ip"));
        assert!(!h.contains_key("x-http-method-override"));
        assert_eq!(h["x-forwarded-proto"], "http");
        assert_eq!(h["x-forwarded-host"], "api.example");
        assert_eq!(h[HOST], "10.0.0.1:3000");
        assert_eq!(h[&X_REQUEST_ID], "rid-1");
    }

    #[test]
    fn open_routes_get_no_identity_but_lose_spoofed_headers() {
        let mut h = HeaderMap::new();
        h.insert("x-keygate-tenant", HeaderValue::from_static("evil"));
        let rid = HeaderValue::from_static("rid-1");
        let scan = scan_request_headers(&h, "x-keygate-", UnderscoreHeaders::Drop);
        rewrite_request_headers(
            &mut h,
            None,
            &IdentitySettings::default(),
            &upstream(),
            &Forwarded {
                client_ip: &ip_value("192.0.2.7".parse().unwrap()),
                trusted: false,
                proto: "http",
                host: None,
                request_id: &rid,
                scan,
                tenant_header: None,
                client_cert: None,
            },
        );
        assert!(h.keys().all(|k| !k.as_str().starts_with("x-keygate-")));
    }

    #[test]
    fn set_path_keeps_the_query() {
        let mut uri: Uri = "/x/../a%2e?q=%2e%2e&b".parse().unwrap();
        set_path(&mut uri, "/a.").unwrap();
        assert_eq!(uri, "/a.?q=%2e%2e&b");
        let mut uri: Uri = "http://h:1//b".parse().unwrap();
        set_path(&mut uri, "/b").unwrap();
        assert_eq!(uri, "http://h:1/b");
    }
}
