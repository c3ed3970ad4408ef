//! Forwarding headers and the peer they are about: which peers are trusted proxies
//! (`server.trusted_proxies`), the client address as keygate saw it, and the headers in which
//! a peer asserts one (`X-Forwarded-For/Proto/Host`, `Forwarded`, `X-Real-IP`).
//!
//! Promise: a peer that is not a trusted proxy cannot plant a client address or a host. Its
//! `X-Forwarded-*` are replaced by what keygate saw, and its `Forwarded` and `X-Real-IP`
//! (which keygate does not set) are removed; a trusted proxy's are kept, and the proxy is
//! appended to `X-Forwarded-For` as the last hop.

use std::net::IpAddr;

use http::header::{self, HeaderName};
use http::{HeaderMap, HeaderValue};

static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");
static X_FORWARDED_PROTO: HeaderName = HeaderName::from_static("x-forwarded-proto");
static X_FORWARDED_HOST: HeaderName = HeaderName::from_static("x-forwarded-host");
static X_REAL_IP: HeaderName = HeaderName::from_static("x-real-ip");

/// The client end of a proxy connection, worked out once per connection: every phase of its
/// requests sees it.
pub struct Peer {
    /// Its address, as an `X-Forwarded-For` value.
    pub ip: HeaderValue,
    /// Whether it is a trusted proxy (`server.trusted_proxies`).
    pub trusted: bool,
    /// The scheme the client spoke to keygate: `http`, or `https` over TLS (sent upstream as
    /// `X-Forwarded-Proto`).
    pub proto: &'static str,
    /// The subject of the client certificate the TLS handshake verified, if any (sent
    /// upstream as `<prefix>client-cert-subject`).
    pub client_cert: Option<HeaderValue>,
}

impl Peer {
    /// The peer at `ip` over cleartext, trusted if a trusted network contains it.
    pub fn new(ip: IpAddr, trusted: &[IpNet]) -> Self {
        Peer {
            ip: ip_value(ip),
            trusted: trusted.iter().any(|net| net.contains(ip)),
            proto: "http",
            client_cert: None,
        }
    }

    /// The same peer over TLS, with the subject of its verified client certificate, if any.
    pub fn over_tls(self, client_cert: Option<HeaderValue>) -> Self {
        Peer {
            proto: "https",
            client_cert,
            ..self
        }
    }
}

/// A client address as an `X-Forwarded-For` value.
pub fn ip_value(ip: IpAddr) -> HeaderValue {
    HeaderValue::try_from(ip.to_string()).expect("an IP address is a valid header value")
}

/// Headers in which a peer asserts a client address, besides `X-Forwarded-For`: kept from a
/// trusted proxy, removed otherwise (the removal rides on the header scan, see
/// [`super::headers`]).
pub(super) fn client_addresses() -> [&'static HeaderName; 2] {
    [&header::FORWARDED, &X_REAL_IP]
}

/// Sets `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host`: a trusted proxy's
/// view of the client is kept and the proxy appended as the last hop; anyone else's claims
/// are replaced by what keygate saw (`client_ip`, `proto`, `host`).
pub(super) fn set_forwarding_headers(
    headers: &mut HeaderMap,
    client_ip: &HeaderValue,
    trusted: bool,
    proto: &'static str,
    host: Option<&HeaderValue>,
) {
    if trusted {
        append_forwarded_for(headers, client_ip);
    } else {
        headers.insert(X_FORWARDED_FOR.clone(), client_ip.clone());
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_PROTO)) {
        headers.insert(X_FORWARDED_PROTO.clone(), HeaderValue::from_static(proto));
    }
    if !(trusted && headers.contains_key(&X_FORWARDED_HOST)) {
        match host {
            Some(h) => headers.insert(X_FORWARDED_HOST.clone(), h.clone()),
            None => headers.remove(&X_FORWARDED_HOST),
        };
    }
}

/// Appends the client address to `X-Forwarded-For` (from a trusted proxy), folding earlier
/// values into one header.
fn append_forwarded_for(headers: &mut HeaderMap, ip: &HeaderValue) {
    if !headers.contains_key(&X_FORWARDED_FOR) {
        // The common case, without formatting or allocating.
        headers.insert(X_FORWARDED_FOR.clone(), ip.clone());
        return;
    }
    let mut value = String::new();
    for prior in headers.get_all(&X_FORWARDED_FOR) {
        if let Ok(s) = prior.to_str() {
            value.push_str(s);
            value.push_str(", ");
        }
    }
    value.push_str(ip.to_str().unwrap_or_default());
    if let Ok(v) = HeaderValue::try_from(value) {
        headers.insert(X_FORWARDED_FOR.clone(), v);
    }
}

/// An IP network: an address and how many leading bits of it a peer must share (a CIDR range
/// like `10.0.0.0/8`; a bare address is a range of one).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpNet {
    addr: IpAddr,
    prefix: u8,
}

impl IpNet {
    /// Parses `10.0.0.0/8`, `fd00::/8` or a bare address. The address must be the network's
    /// first (`10.1.0.0/8` is refused: it reads like a typo for `/16`).
    pub fn parse(v: &str) -> Option<IpNet> {
        let (addr, prefix) = match v.split_once('/') {
            Some((a, p)) => (a.parse::<IpAddr>().ok()?, Some(p)),
            None => (v.parse::<IpAddr>().ok()?, None),
        };
        let max = if addr.is_ipv4() { 32 } else { 128 };
        let prefix = match prefix {
            Some(p) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => p.parse().ok()?,
            Some(_) => return None,
            None => max,
        };
        if prefix > max {
            return None;
        }
        let net = IpNet { addr, prefix };
        (net.masked(addr) == Self::bits(addr)).then_some(net)
    }

    fn bits(ip: IpAddr) -> u128 {
        match ip {
            IpAddr::V4(v4) => u32::from(v4).into(),
            IpAddr::V6(v6) => u128::from(v6),
        }
    }

    /// `ip`'s bits with everything past the prefix cleared.
    fn masked(&self, ip: IpAddr) -> u128 {
        let width: u32 = if ip.is_ipv4() { 32 } else { 128 };
        let host_bits = width - u32::from(self.prefix);
        if host_bits >= 128 {
            0
        } else {
            (Self::bits(ip) >> host_bits) << host_bits
        }
    }

    /// Whether `ip` is in the network (an IPv4 address in IPv6 form, `::ffff:10.0.0.1`, counts
    /// as the IPv4 address).
    pub fn contains(&self, ip: IpAddr) -> bool {
        let ip = ip.to_canonical();
        ip.is_ipv4() == self.addr.is_ipv4() && self.masked(ip) == Self::bits(self.addr)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
    fn a_trusted_proxy_is_appended_and_anyone_else_replaced() {
        let ip = ip_value("192.0.2.7".parse().unwrap());
        let host = HeaderValue::from_static("api.example");
        let claims = [
            ("x-forwarded-for", "198.51.100.1"),
            ("x-forwarded-for", "198.51.100.2"),
            ("x-forwarded-proto", "https"),
        ];
        let mut h = headers(&claims);
        set_forwarding_headers(&mut h, &ip, true, "http", Some(&host));
        assert_eq!(
            h["x-forwarded-for"],
            "198.51.100.1, 198.51.100.2, 192.0.2.7"
        );
        assert_eq!(h["x-forwarded-proto"], "https");
        assert_eq!(h["x-forwarded-host"], "api.example");

        let mut h = headers(&claims);
        h.append("x-forwarded-host", HeaderValue::from_static("claimed"));
        set_forwarding_headers(&mut h, &ip, false, "http", None);
        assert_eq!(h.get_all("x-forwarded-for").iter().count(), 1);
        assert_eq!(h["x-forwarded-for"], "192.0.2.7");
        assert_eq!(h["x-forwarded-proto"], "http");
        assert!(
            !h.contains_key("x-forwarded-host"),
            "no host seen, none claimed"
        );
    }

    #[test]
    fn peers_are_trusted_by_network() {
        let nets = [
            IpNet::parse("10.0.0.0/8").unwrap(),
            IpNet::parse("fd00::/8").unwrap(),
        ];
        for (ip, trusted) in [
            ("10.1.2.3", true),
            ("::ffff:10.1.2.3", true),
            ("fd12::1", true),
            ("11.0.0.1", false),
            ("::1", false),
        ] {
            let peer = Peer::new(ip.parse().unwrap(), &nets);
            assert_eq!(peer.trusted, trusted, "{ip}");
            assert_eq!(peer.ip, ip_value(ip.parse().unwrap()));
        }
        assert!(!Peer::new("10.0.0.1".parse().unwrap(), &[]).trusted);
    }
}
